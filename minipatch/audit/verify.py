"""Verify another implementation's patches (``python -m minipatch verify-patches``, M7 / M8).

Given a model, the with-context input (token ids, or a continuous stream [T, D] for the
stream models of :mod:`minipatch.stream`) and patches for the kept positions:

1. the patched run without context against the with-context run at the kept positions, every
   hidden state and every sublayer the theorem fixes (:func:`fixed_sublayers`): the first
   layer and sublayer beyond ``rtol``, with the error there and just before;
2. the output (logits, or the stream's last block output), and the negative control (the
   unpatched run without context must differ, else the check could not fail);
3. the rank of each weight patch (the theorem's patches are rank 1 per token);
4. each layer's patches against minipatch's own constructions on the same stream
   (:mod:`.constructions`). Verdicts: ``same`` (equal to one of minipatch's constructions,
   named: unique where M1, M2 given the hidden, and the trust-region target are unique);
   ``different valid construction`` (the stream stays exact but the patches equal none of
   minipatch's: the outer witness is not unique -- M6a..M6d, a bias or M2, the MoE expert
   split, the trust region's hard case -- and M1 is unique only as the minimum-norm patch);
   ``wrong`` at the first diverging layer, naming the sublayer and the parameter whose patch
   differs most from minipatch's closest construction; later layers are ``not judged``.

``ok``: every hidden state and sublayer and the output within ``rtol``, the control beyond it,
and every weight patch of rank <= 1.
"""
from __future__ import annotations

import numpy as np

from ..absorb import VALUES
from ..backend import device, to_numpy
from ..controllability import take_rows
from ..errors import InputError
from .constructions import acts_at, candidates, compare_layer, max_rank
from ..metrics import rel_err
from .sublayers import SUBLAYERS, model_sublayers, scan

NON_UNIQUE = ("the outer witness is not unique (M6a..M6d, a bias or M2, the MoE expert split, the trust "
              "region's hard case)")


def _runs(model, inputs, kept, patches, window_by):
    """(with-context trace, patched trace, with-context output at kept, patched output, unpatched
    output): logits for token ids, the last block's output for a stream."""
    from .. import stream

    xp, dev = model.xp, device(model.params["embed.weight"])
    K = xp.asarray(kept, device=dev)
    ctx_tr, p_tr = {}, {}
    if stream.is_stream(inputs):
        full = stream.run_stream(model, inputs, trace=ctx_tr, window_by=window_by)
        sub = take_rows(inputs, K)
        patched = stream.run_stream(model, sub, kept, patches, p_tr, window_by)
        plain = stream.run_stream(model, sub, kept, window_by=window_by)
    else:
        full = model.forward(inputs, trace=ctx_tr, window_by=window_by)
        patched = model.forward(inputs[kept], positions=kept, patches=patches, trace=p_tr, window_by=window_by)
        plain = model.forward(inputs[kept], positions=kept, window_by=window_by)
    return ctx_tr, p_tr, to_numpy(take_rows(full, K)), to_numpy(patched), to_numpy(plain), K


def split(n, kept, context):
    """(kept, context) as int64 arrays that partition 0..n-1 (context defaults to the rest)."""
    kept = np.asarray(kept, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), kept)
    if kept.size == 0 or kept.min() < 0 or kept.max() >= n:
        raise InputError(f"kept positions must lie in [0, {n}) for {n} input tokens, got {kept.tolist()}")
    if context is not None and not np.array_equal(np.sort(np.asarray(context, dtype=np.int64)), rest):
        raise InputError(f"kept {kept.tolist()} and context {np.asarray(context).tolist()} must partition "
                         f"0..{n - 1} (the with-context run has {n} tokens)")
    if rest.size == 0:
        raise InputError("no context: every position is kept")
    return kept, rest


def verify(model, inputs, patches, context=None, window_by="position", rtol=1e-9, patch_rtol=1e-6,
           method="auto"):
    """Check ``patches`` (a :class:`~minipatch.patches.Patches` for the kept positions) on ``model``.

    Args:
      inputs: int [T] token ids with context, or a float [T, D] stream (stream models).
      context: the absorbed positions (default: every position not kept); with the kept ones
        they must partition 0..T-1.
      rtol: bar for streams and outputs (relative to the with-context max).
      patch_rtol: bar for a patch to equal one of minipatch's constructions.
      method: the construction reported as minipatch's choice ('auto').
    Returns:
      the result dict (module docstring; keys of ``minipatch.cli.verify_patches.KEYS`` and per-layer details).
    """
    T = int(np.shape(inputs)[0])
    kept, context = split(T, patches.positions, context)
    ctx_tr, p_tr, want, got, plain, K = _runs(model, inputs, kept, patches, window_by)
    hs_ctx = [take_rows(h, K) for h in ctx_tr["hidden_states"]]
    hs_errs = [rel_err(to_numpy(a), to_numpy(b)) for a, b in zip(p_tr["hidden_states"], hs_ctx)]
    bad = [i for i, e in enumerate(hs_errs) if not e <= rtol]
    ours_sub, ctx_sub = fixed_sublayers(model, p_tr, ctx_tr, kept)
    table, first, before = scan(ours_sub, ctx_sub, rtol, ("embeddings", hs_errs[0]))
    r = {"arch": model.cfg.family, "kept_positions": kept.tolist(), "context_positions": context.tolist(),
         "window_by": window_by, "rtol": rtol, "patch_rtol": patch_rtol,
         "output": "stream" if _is_stream(inputs) else "logits",
         "logits_max_rel_err": rel_err(got, want), "unpatched_max_rel_err": rel_err(plain, want),
         "hidden_state_rel_errs": hs_errs, "first_divergent_layer": bad[0] if bad else None,
         "sublayer_rel_errs": table, "first_divergent_sublayer": None, "sublayer_rel_err": None,
         "sublayer_before": None, "sublayer_rel_err_before": None}
    if first is not None:
        r.update(first_divergent_sublayer={"layer": first["layer"], "sublayer": first["sublayer"]},
                 sublayer_rel_err=first["rel_err"])
        if before is not None:
            r.update(sublayer_before={"layer": before["layer"], "sublayer": before["sublayer"]},
                     sublayer_rel_err_before=before["rel_err"])
    r["layers"], r["culprit"] = _judge(model, patches, ctx_tr, p_tr, K, first, patch_rtol, method)
    ranks = [v["rank"] for lay in r["layers"] for v in lay["params"].values() if v["rank"] is not None]
    r["max_rank"] = max(ranks) if ranks else None
    r["rank_ok"] = r["max_rank"] is None or r["max_rank"] <= 1
    exact = first is None and not bad and r["logits_max_rel_err"] <= rtol
    r["control_ok"] = r["unpatched_max_rel_err"] > rtol
    r["ok"] = bool(exact and r["control_ok"] and r["rank_ok"])
    r["verdict"] = _summary(r, exact)
    return r


def verify_file(checkpoint, patch_path, tokens=None, context=None, dtype="float64", rtol=1e-9, patch_rtol=1e-6,
                method="auto"):
    """Load the model and the patch file, then :func:`verify`; returns the result dict (with
    ``path``, ``patches``, ``dtype`` and ``notes``).

    ``tokens`` (int [T]) default to the file's ``input_ids``; ``context`` (positions) to the
    file's, else every position not kept. Patches of another floating dtype than the model's are
    cast to it (exact from float32 to float64), with a note.
    """
    from .. import load
    from ..patchfile import cast_patches, load_patches

    model = load(checkpoint, dtype=dtype)
    got = load_patches(patch_path, model)
    notes = []
    ids = np.asarray(tokens, dtype=np.int64) if tokens is not None else got.input_ids
    if ids is None:
        raise InputError(f"{patch_path} has no input_ids: pass --tokens (the with-context token ids)")
    if tokens is not None and got.input_ids is not None and not np.array_equal(ids, got.input_ids):
        raise InputError(f"--tokens differ from the input_ids stored in {patch_path}")
    ctx = got.context if got.context is not None else context
    patches = got.patches
    if got.dtype is not None and got.dtype != np.dtype(dtype):
        notes.append(f"the patches are {got.dtype}; cast to the model's {dtype}")
        patches = cast_patches(patches, np.dtype(dtype))
    r = verify(model, ids, patches, ctx, got.window_by, rtol, patch_rtol, method)
    r.update(path=str(checkpoint), patches=str(patch_path), dtype=str(dtype), notes=notes)
    return r


def fixed_sublayers(model, p_tr, ctx_tr, kept):
    """(patched run's values, what the theorem says they are) for the sublayers it fixes.

    The layer input is the with-context one, hence the attention's input norm; the MLP hidden is
    the with-context hidden (M1, input controllability); the MLP's output (the post-MLP norm
    where there is one) is the with-context block output minus the patched run's own residual
    (z for sequential blocks, x + Attn(x) for parallel ones, nothing without skip: M2 / M6 /
    M8, output controllability); and the block output is the with-context one. The attention
    output and the MLP input are not fixed: they carry the context's effect.
    """
    ours = model_sublayers(model, p_tr)
    ctx = {k: v[:, kept] for k, v in model_sublayers(model, ctx_tr).items()}
    keep = [k for k in ("attn_norm", "mlp_hidden", "out") if k in ours]
    got, want = {k: ours[k] for k in keep}, {k: ctx[k] for k in keep}
    layout = model.spec.layout
    if layout != "postnorm":
        last = "mlp_post_norm" if "mlp_post_norm" in ours else "mlp_out"
        rows = p_tr["layers"]
        resid = {"sequential": lambda r: r["z"], "parallel": lambda r: r["x"] + r["a"],
                 "noskip": lambda r: 0 * r["z"]}[layout]
        got[last] = ours[last]
        want[last] = ctx["out"] - np.stack([to_numpy(resid(r)) for r in rows])
    return got, want


def _is_stream(inputs):
    from ..stream import is_stream

    return is_stream(inputs)


def _judge(model, patches, ctx_tr, p_tr, K, first, patch_rtol, method):
    """Per-layer verdicts and the culprit parameter of the first diverging layer (or None)."""
    layers, culprit, n = [], None, len(patches.positions)
    for l, theirs in enumerate(patches.layers):
        ctx_row = {k: take_rows(ctx_tr["layers"][l][k], K) for k in VALUES}
        row = p_tr["layers"][l]
        cands, auto = candidates(model, l, {"x": row["x"], "a": row["a"], "z": row["z"]}, ctx_row, method)
        table = compare_layer(model, l, theirs, cands, n)
        best = min(table, key=lambda c: max(table[c].values(), default=0.0)) if table else None
        errs = table.get(best, {})
        match = best is not None and max(errs.values(), default=0.0) <= patch_rtol
        lp = model.params["layers"][l]
        info = {"layer": l, "construction": best if match else None, "closest": best, "minipatch": auto,
                "params": {name: {"rank": max_rank(p, n), "acts_at": acts_at(model.spec, name, lp),
                                  "rel_diff": errs.get(name)} for name, p in theirs.items()}}
        if first is not None and l > first["layer"]:
            info["verdict"] = "not judged (the stream diverged before)"
        elif first is not None and l == first["layer"]:
            stop = SUBLAYERS.index(first["sublayer"])
            suspects = {k: e for k, e in errs.items() if SUBLAYERS.index(acts_at(model.spec, k, lp)) <= stop}
            name = max(suspects, key=suspects.get) if suspects else None
            culprit = {"layer": l, "sublayer": first["sublayer"], "parameter": name,
                       "rel_diff": suspects.get(name), "closest": best}
            gap = suspects.get(name)
            how = (f"which minipatch's {best} leaves unpatched" if gap == float("inf") else
                   f"differs from minipatch's {best} by {gap:.1e}")
            info["verdict"] = (f"wrong: diverges at {first['sublayer']}; parameter {name} {how}" if name else
                               f"wrong: diverges at {first['sublayer']} though its patches equal minipatch's {best}")
        elif match and best == auto:
            info["verdict"] = f"same as minipatch's {best}"
        elif match:
            info["verdict"] = f"a different valid construction: {best} (minipatch's auto picks {auto})"
        else:
            differ = sorted(k for k, e in errs.items() if e > patch_rtol)
            inner = [k for k in differ if acts_at(model.spec, k, lp) == "mlp_hidden"]
            why = "not the minimum-norm M1 patch" if inner else NON_UNIQUE
            info["verdict"] = (f"a different valid construction, none of minipatch's: {', '.join(differ)} "
                               f"differ from the closest, {best} ({why})")
        layers.append(info)
    return layers, culprit


def _summary(r, exact):
    """One line: exact and how it was constructed, or where it goes wrong."""
    if not exact:
        c = r["culprit"]
        where = (f"layer {c['layer']} sublayer {c['sublayer']}, parameter {c['parameter']}" if c and c["parameter"]
                 else f"layer {c['layer']} sublayer {c['sublayer']}" if c else "the output")
        return f"wrong: the patched run diverges at {where}"
    diff = [l for l in r["layers"] if l["verdict"].startswith("a different")]
    text = "exact"
    if diff:
        named = sorted({f"{l['construction']} where minipatch's auto picks {l['minipatch']}"
                        for l in diff if l["construction"]})
        text += (f"; a different valid construction at layers {[l['layer'] for l in diff]}"
                 + (f" ({'; '.join(named)})" if named else ""))
    else:
        text += "; the same construction as minipatch"
    if not r["control_ok"]:
        text += "; but the unpatched run is as close: the context changes nothing here, the check cannot fail"
    if not r["rank_ok"]:
        text += f"; but a weight patch has rank {r['max_rank']} (the theorem's are rank 1)"
    return text
