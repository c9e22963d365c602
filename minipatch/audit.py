"""``python -m minipatch audit PATH --reference REF.npz``: check another implementation.

PATH is a Hugging Face checkpoint folder or a ``.gguf`` file. REF.npz (read with
``allow_pickle=False``) holds ``input_ids`` [T], ``logits`` [T, V] and optionally
``hidden_states`` [L+1, T, D] (Hugging Face layout: [0] embeddings, [i] after layer i,
[L] after the final norm) and ``context_positions``. The audit reports:

- the max absolute and relative logit error (relative to max |reference logits|);
- the first layer whose hidden state diverges beyond ``rtol`` (null if none);
- with context positions, the theorem on that checkpoint: the patched-without-context
  logits at the kept positions against our with-context logits and against the reference
  logits, plus the unpatched error as the negative control.

``ok`` is true iff the logits and every hidden state agree within ``rtol`` and the
patched logits agree with ours within ``rtol`` and with the reference within ``rtol``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .errors import ModelFileError

KEYS = ("arch", "logits_max_abs_err", "logits_max_rel_err", "first_divergent_layer",
        "absorb_max_rel_err_self", "absorb_max_rel_err_reference", "unpatched_max_rel_err", "ok")


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def read_reference(path):
    """The reference arrays, validated (never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise ModelFileError(f"{path}: not a readable .npz of plain arrays ({e})") from None
    for k in ("input_ids", "logits"):
        if k not in ref:
            raise ModelFileError(f"{path}: missing key {k!r}")
    ids, lg = ref["input_ids"], ref["logits"]
    if ids.ndim != 1 or lg.ndim != 2 or lg.shape[0] != ids.shape[0]:
        raise ModelFileError(f"{path}: input_ids {ids.shape} and logits {lg.shape} do not fit [T], [T, V]")
    hs = ref.get("hidden_states")
    if hs is not None and (hs.ndim != 3 or hs.shape[1] != ids.shape[0]):
        raise ModelFileError(f"{path}: hidden_states {hs.shape} is not [L+1, T, D]")
    return ref


def audit(path, reference, rtol=1e-9, dtype="float64", method="auto", window_by="position"):
    """Run the audit; returns the result dict with the keys of ``KEYS`` (and a few more)."""
    from . import load
    from .absorb import absorb, patched_forward
    from .backend import to_numpy

    ref = read_reference(reference)
    model = load(path, dtype=dtype)
    ids = ref["input_ids"].astype(np.int64)
    if ref["logits"].shape[1] != model.cfg.vocab_size:
        raise ModelFileError(f"reference has {ref['logits'].shape[1]} logits per token, the model "
                             f"{model.cfg.vocab_size}")
    tr = {}
    logits = to_numpy(model.forward(ids, trace=tr))
    want = ref["logits"].astype(np.float64)
    out = {"arch": model.cfg.family, "path": str(path), "dtype": str(dtype), "rtol": rtol,
           "logits_max_abs_err": float(np.max(np.abs(logits - want))),
           "logits_max_rel_err": _rel(logits, want), "first_divergent_layer": None,
           "hidden_state_rel_errs": None, "absorb_max_rel_err_self": None,
           "absorb_max_rel_err_reference": None, "unpatched_max_rel_err": None}
    hs = ref.get("hidden_states")
    if hs is not None:
        if hs.shape[0] != model.cfg.n_layers + 1:
            raise ModelFileError(f"hidden_states has {hs.shape[0]} entries, the model {model.cfg.n_layers + 1}")
        errs = [_rel(to_numpy(ours), h.astype(np.float64)) for ours, h in zip(tr["hidden_states"], hs)]
        out["hidden_state_rel_errs"] = errs
        bad = [i for i, e in enumerate(errs) if e > rtol]
        out["first_divergent_layer"] = bad[0] if bad else None
    ok = out["logits_max_rel_err"] <= rtol and out["first_divergent_layer"] is None
    if "context_positions" in ref:
        res = absorb(model, ids, ref["context_positions"], method=method, window_by=window_by)
        patched = to_numpy(patched_forward(model, ids, res, window_by=window_by))
        unpatched = to_numpy(model.forward(ids[res.kept], positions=res.kept, window_by=window_by))
        out["kept_positions"] = res.kept.tolist()
        out["methods"] = list(res.methods)
        out["absorb_max_rel_err_self"] = _rel(patched, logits[res.kept])
        out["absorb_max_rel_err_reference"] = _rel(patched, want[res.kept])
        out["unpatched_max_rel_err"] = _rel(unpatched, want[res.kept])
        ok = ok and out["absorb_max_rel_err_self"] <= rtol and out["absorb_max_rel_err_reference"] <= rtol
    out["ok"] = bool(ok)
    return out


def format_report(r):
    f = lambda v: "-" if v is None else (f"{v:.3e}" if isinstance(v, float) else str(v))
    lines = [f"audit of {r['path']} ({r['arch']}, {r['dtype']}, rtol {r['rtol']:g})",
             f"  logits: max abs err {f(r['logits_max_abs_err'])}, max rel err {f(r['logits_max_rel_err'])}"]
    if r["hidden_state_rel_errs"] is not None:
        lines.append("  hidden states (rel err): " + " ".join(f"{i}:{e:.1e}" for i, e in enumerate(r["hidden_state_rel_errs"])))
        fd = r["first_divergent_layer"]
        lines.append("  first divergent layer: " + ("none" if fd is None else
                     f"{fd} ({'embeddings' if fd == 0 else 'after the final norm' if fd == len(r['hidden_state_rel_errs']) - 1 else f'output of decoder layer {fd - 1}'})"))
    if r["absorb_max_rel_err_self"] is not None:
        lines.append(f"  theorem at kept positions {r['kept_positions']} ({'/'.join(sorted(set(r['methods'])))}):")
        lines.append(f"    patched vs our with-context logits: {f(r['absorb_max_rel_err_self'])}")
        lines.append(f"    patched vs reference logits:        {f(r['absorb_max_rel_err_reference'])}")
        lines.append(f"    unpatched vs reference (control):   {f(r['unpatched_max_rel_err'])}")
    lines.append("  OK" if r["ok"] else "  NOT OK")
    return "\n".join(lines)


def add_parser(sub):
    p = sub.add_parser("audit", help="compare a checkpoint with reference logits and check the theorem on it")
    p.add_argument("path", help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument("--reference", required=True, help=".npz with input_ids, logits[, hidden_states, context_positions]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance (default 1e-9)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--method", default="auto", help="outer witness: auto, m6a, m6b, m6c, m2, bias, one, all")
    p.add_argument("--window-by", default="position", choices=("position", "index"))
    p.set_defaults(func=run)
    return p


def run(args):
    try:
        r = audit(Path(args.path), Path(args.reference), args.rtol, args.dtype, args.method, args.window_by)
    except (ModelFileError, FileNotFoundError, ValueError) as e:
        if args.json:
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        else:
            print(f"audit failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: r[k] for k in KEYS} | {"hidden_state_rel_errs": r["hidden_state_rel_errs"]}))
    else:
        print(format_report(r))
    return 0 if r["ok"] else 1
