"""``python -m minipatch audit PATH --reference REF.npz``: the command line and its report.

Exit status: 0 ok, 1 not ok, 2 bad model or reference (a named error; with ``--json`` the
object ``{"ok": false, "error": "ModelFileError: ..."}``).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import MinipatchError, ModelFileError
from ..audit.compare import KEYS, audit
from ..audit.sublayers import describe


def _where(i, n):
    """What hidden_states[i] of n entries is, in the HF layout."""
    return "embeddings" if i == 0 else "after the final norm" if i == n - 1 else f"output of decoder layer {i - 1}"


def _f(v):
    return "-" if v is None else (f"{v:.3e}" if isinstance(v, float) else str(v))


def format_report(r):
    """The audit result ``r`` as a short human-readable report (str)."""
    lines = [f"audit of {r['path']} ({r['arch']}, {r['dtype']}, rtol {r['rtol']:g})",
             f"  logits: max abs err {_f(r['logits_max_abs_err'])}, max rel err {_f(r['logits_max_rel_err'])}"]
    errs = r["hidden_state_rel_errs"]
    if errs is not None:
        lines.append("  hidden states (rel err): " + " ".join(f"{i}:{e:.1e}" for i, e in enumerate(errs)))
        fd = r["first_divergent_layer"]
        lines.append("  first divergent layer: " + ("none" if fd is None else f"{fd} ({_where(fd, len(errs))})"))
    if r.get("sublayer_rel_errs") is not None:
        worst = {k: max(v) for k, v in r["sublayer_rel_errs"].items() if v}
        lines.append("  sublayers (max rel err over layers): " + " ".join(f"{k}:{e:.1e}" for k, e in worst.items()))
        lines.append(divergence_line(r, _f, "rel err "))
    if r["absorb_max_rel_err_self"] is not None:
        lines.append(f"  theorem at kept positions {r['kept_positions']} ({'/'.join(sorted(set(r['methods'])))}):")
        lines.append(f"    patched vs our with-context logits: {_f(r['absorb_max_rel_err_self'])}")
        lines.append(f"    patched vs reference logits:        {_f(r['absorb_max_rel_err_reference'])}")
        lines.append(f"    unpatched vs reference (control):   {_f(r['unpatched_max_rel_err'])}")
    return "\n".join(lines + closing_lines(r))


def divergence_line(r, fmt, label=""):
    """'  first divergent sublayer: layer 0 attn_norm (...): <err> (just before, ...: <err>)'."""
    fs = r["first_divergent_sublayer"]
    if fs is None:
        return "  first divergent sublayer: none"
    before = r["sublayer_before"]
    prev = "" if before is None else f" (just before, {describe(dict(before, rel_err=0))}: {fmt(r['sublayer_rel_err_before'])})"
    return f"  first divergent sublayer: {describe(dict(fs, rel_err=0))}: {label}{fmt(r['sublayer_rel_err'])}{prev}"


def closing_lines(r, verdict=None):
    """The notes, the one-line verdict (if any) and OK / NOT OK."""
    out = [f"  note: {note}" for note in r.get("notes", [])]
    if verdict is not None:
        out.append(f"  verdict: {verdict}")
    return out + ["  OK" if r["ok"] else "  NOT OK"]


def add_parser(sub):
    """Register the ``audit`` subcommand on the argparse subparsers ``sub``."""
    p = sub.add_parser("audit", help="compare a checkpoint with reference logits and check the theorem on it")
    p.add_argument("path", help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument("--reference", required=True,
                   help=".npz with input_ids, logits[, hidden_states, sublayers.*, context_positions] "
                        "(python -m minipatch reference makes one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance (default 1e-9)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--method", default="auto", help="outer witness: auto, m6a, m6b, m6c, m6d, m2, bias, one, all")
    p.add_argument("--window-by", default="position", choices=("position", "index"))
    p.set_defaults(func=run)
    return p


def to_json(obj):
    """``json.dumps`` with non-finite numbers written as the strings 'inf' / 'nan' (strict JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False)


def fail(args, command, e):
    """Print a bad-input error (JSON or stderr) and return exit status 2."""
    if args.json:
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
    else:
        print(f"{command} failed: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


def run(args):
    """Run the ``audit`` subcommand: exit status 0 if ok, 1 if not ok, 2 on a bad model or reference."""
    try:
        try:
            r = audit(Path(args.path), Path(args.reference), args.rtol, args.dtype, args.method, args.window_by)
        except MemoryError:
            raise ModelFileError(f"{args.reference}: the audit of this reference needs more memory than this "
                                 "machine has; use a shorter reference") from None
    except (MinipatchError, OSError, ValueError) as e:   # bad input: exit 2, never the "not ok" code 1
        return fail(args, "audit", e)
    if args.json:
        print(to_json({k: r[k] for k in KEYS} | {k: r[k] for k in ("hidden_state_rel_errs", "sublayer_rel_errs",
                                                                  "notes")}))
    else:
        print(format_report(r))
    return 0 if r["ok"] else 1
