"""The audit itself: our float64 forward of a checkpoint against a reference file.

Reports the max absolute and relative logit error (relative to max |reference logits|); the
first hidden state beyond ``rtol``; with ``sublayers.*`` in the reference, the first layer and
sublayer beyond ``rtol`` with the error there and just before (:mod:`.sublayers`); with context
positions, the theorem on that checkpoint (M7: patched-without-context logits at the kept
positions against our with-context logits and against the reference, the unpatched error as
the negative control).

``ok`` is true iff the logits, every hidden state and every sublayer agree within ``rtol`` and
the patched logits agree with ours and with the reference within ``rtol``.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelFileError
from .reference import PREFIX, load_reference
from ..metrics import rel_err
from .sublayers import model_sublayers, scan

KEYS = ("arch", "logits_max_abs_err", "logits_max_rel_err", "first_divergent_layer",
        "first_divergent_sublayer", "sublayer_rel_err", "sublayer_before", "sublayer_rel_err_before",
        "absorb_max_rel_err_self", "absorb_max_rel_err_reference", "unpatched_max_rel_err", "ok")
"""The keys of ``--json`` (always present; null where the reference does not allow the check)."""


def audit(path, reference, rtol=1e-9, dtype="float64", method="auto", window_by="position"):
    """Run the audit; returns the result dict with the keys of ``KEYS`` (and a few more:
    ``hidden_state_rel_errs``, ``sublayer_rel_errs`` {name: [per layer]}, ``notes``)."""
    from .. import load
    from ..absorb import absorb, patched_forward
    from ..backend import to_numpy

    model = load(path, dtype=dtype)   # first: the reference's shapes are bounded by the model's
    cfg = model.cfg
    ref, notes = load_reference(reference, cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.d_ff)
    ids = ref["input_ids"].astype(np.int64)
    tr = {}
    logits = to_numpy(model.forward(ids, trace=tr))
    want = ref["logits"].astype(np.float64)
    out = {"arch": cfg.family, "path": str(path), "dtype": str(dtype), "rtol": rtol,
           "logits_max_abs_err": float(np.max(np.abs(logits - want))),
           "logits_max_rel_err": rel_err(logits, want), "first_divergent_layer": None,
           "hidden_state_rel_errs": None, "first_divergent_sublayer": None, "sublayer_rel_err": None,
           "sublayer_before": None, "sublayer_rel_err_before": None, "sublayer_rel_errs": None,
           "absorb_max_rel_err_self": None, "absorb_max_rel_err_reference": None,
           "unpatched_max_rel_err": None, "notes": notes}
    hs = ref.get("hidden_states")
    if hs is not None:
        if hs.shape[0] != cfg.n_layers + 1 or hs.shape[2] != cfg.d_model:
            raise ModelFileError(f"reference hidden_states {hs.shape} do not fit the model: [L+1, T, D] = "
                                 f"[{cfg.n_layers + 1}, {ids.shape[0]}, {cfg.d_model}]")
        errs = [rel_err(to_numpy(ours), h) for ours, h in zip(tr["hidden_states"], hs)]
        out["hidden_state_rel_errs"] = errs
        bad = [i for i, e in enumerate(errs) if not e <= rtol]
        out["first_divergent_layer"] = bad[0] if bad else None
    subs = {k[len(PREFIX):]: v for k, v in ref.items() if k.startswith(PREFIX)}
    if subs:
        ours = model_sublayers(model, tr)
        missing = sorted(set(subs) - set(ours))
        if missing:
            notes.append(f"the reference has sublayers this {cfg.family} block does not: {', '.join(missing)} "
                         "(not compared)")
        start = ("embeddings", out["hidden_state_rel_errs"][0]) if hs is not None else None
        table, first, before = scan(ours, subs, rtol, start)
        out["sublayer_rel_errs"] = table
        if first is not None:
            out["first_divergent_sublayer"] = {"layer": first["layer"], "sublayer": first["sublayer"]}
            out["sublayer_rel_err"] = first["rel_err"]
            if before is not None:
                out["sublayer_before"] = {"layer": before["layer"], "sublayer": before["sublayer"]}
                out["sublayer_rel_err_before"] = before["rel_err"]
    ok = (out["logits_max_rel_err"] <= rtol and out["first_divergent_layer"] is None
          and out["first_divergent_sublayer"] is None)
    if "context_positions" in ref:
        res = absorb(model, ids, ref["context_positions"], method=method, window_by=window_by)
        patched = to_numpy(patched_forward(model, ids, res, window_by=window_by))
        unpatched = to_numpy(model.forward(ids[res.kept], positions=res.kept, window_by=window_by))
        out["kept_positions"] = res.kept.tolist()
        out["methods"] = list(res.methods)
        out["absorb_max_rel_err_self"] = rel_err(patched, logits[res.kept])
        out["absorb_max_rel_err_reference"] = rel_err(patched, want[res.kept])
        out["unpatched_max_rel_err"] = rel_err(unpatched, want[res.kept])
        ok = ok and out["absorb_max_rel_err_self"] <= rtol and out["absorb_max_rel_err_reference"] <= rtol
    out["ok"] = bool(ok)
    return out
