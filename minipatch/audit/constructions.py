"""Another implementation's layer patches against minipatch's own constructions (verify-patches).

For each layer, every outer construction the family has (``spec.outer.methods``: M6a..M6d,
M2 or a bias shift, the MoE expert choices) is built by the block theorem (M8) on *the same
stream* the other patches see -- the patched run's own layer input -- against the with-context
targets. So M1 (the minimum-norm inner patch) and M2 (given the same hidden) are compared where
they are unique, and a construction that is not unique is recognised by name.

Each parameter's patch is compared elementwise as the change it makes: the dense per-token
weight delta (Rank1 or Dense), the bias shift, or the patched norm multiplier minus the
unpatched one (so M6a's additive and M6b's multiplicative scale patches are comparable):
max |theirs - ours| / max |ours|, in token chunks (never a loop over single tokens).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..blocks import layer_patch
from ..errors import NotControllableError
from ..patches import Scale, Shift

CHUNK = 1 << 24      # elements of dense deltas compared at once

ROLES = {"mlp_hidden": "inner (M1)", "mlp_out": "outer", "mlp_post_norm": "outer", "attn_out": "attention",
         "attn_post_norm": "attention", "mlp_in": "post-norm", "out": "post-norm"}


def acts_at(spec, name, params):
    """The sublayer (audit.sublayers.SUBLAYERS) where a patch of parameter ``name`` first shows."""
    base = name.rsplit(".", 1)[0]
    if base in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attn_out"
    if base == "attn_post_norm":
        return "attn_post_norm"
    if base == "attn_res_norm":
        return "mlp_in"
    if base == "mlp_res_norm":
        return "out"
    if base == "mlp_post_norm":
        return "mlp_post_norm"
    if base in spec.inner.reads(params) and not base.startswith(("router", "experts", "shared")):
        return "mlp_hidden"
    return "mlp_out"          # outer weights, and the MoE inner (its hidden is not compared)


def _effect(p, w):
    """The change a patch makes, as numpy [T, ...], evaluated lazily per token chunk."""
    if isinstance(p, Shift):
        return lambda sl: to_numpy(p.d[sl])
    if isinstance(p, Scale):
        return lambda sl: to_numpy(Scale(*(None if a is None else a[sl] for a in (p.add, p.mul))).multiplier(w)
                                   - w)
    if hasattr(p, "u"):
        def dense(sl):
            u, v = to_numpy(p.u[sl]), to_numpy(p.v[sl])
            if v.ndim < u.ndim:
                v = np.broadcast_to(v[:, None, :], u.shape[:-1] + v.shape[-1:])
            return u[..., :, None] * v[..., None, :]
        return dense
    return lambda sl: to_numpy(p.d[sl])


def patch_difference(theirs, ours, w, n_tokens):
    """max |effect(theirs) - effect(ours)| / max |effect(ours)| (a missing patch is zero; 0.0
    when both are missing or both zero; inf when only ours is zero)."""
    w = to_numpy(w)
    a = None if theirs is None else _effect(theirs, w)
    b = None if ours is None else _effect(ours, w)
    if a is None and b is None:
        return 0.0
    per = max(1, CHUNK // max(1, w.size))
    diff = scale = 0.0
    for start in range(0, n_tokens, per):
        sl = slice(start, start + per)
        x = a(sl) if a is not None else 0.0
        y = b(sl) if b is not None else 0.0
        diff = max(diff, float(np.max(np.abs(x - y))))
        scale = max(scale, float(np.max(np.abs(y))))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def candidates(model, layer, noctx, ctx, method="auto"):
    """{construction name: layer patch} of minipatch for one layer, on the given stream, for every
    outer method the family has (those without a witness here are left out), and the name
    ``method='auto'`` picks (None if no construction has a witness)."""
    spec, cfg, lp = model.spec, model.cfg, model.params["layers"][layer]
    out, auto = {}, None
    for m in spec.outer.methods(cfg):
        try:
            name, patch = layer_patch(spec, lp, cfg, noctx, ctx, m)
        except NotControllableError:
            continue
        if m == method:
            auto = name
        if m != "auto":
            out[name] = patch
    return out, auto


def compare_layer(model, layer, theirs, cands, n_tokens):
    """{construction: {param: relative difference}} of the layer patch ``theirs`` against each
    candidate (over the union of their parameter names)."""
    lp, cfg = model.params["layers"][layer], model.cfg
    table = {}
    for cname, ours in cands.items():
        names = sorted(set(theirs) | set(ours))
        table[cname] = {n: patch_difference(theirs.get(n), ours.get(n), _base(lp, n, cfg), n_tokens)
                        for n in names}
    return table


def _base(lp, name, cfg):
    """The unpatched value a patch of ``name`` changes: the weight, or the norm multiplier
    s = offset + g (Gemma's 1 + w) that a Scale patch acts on."""
    w = lp[name]
    rms = name.startswith("mlp_post_norm") or cfg.norm == "rms"
    return w + cfg.norm_offset if ("norm" in name and rms and cfg.norm_offset) else w


def max_rank(p, n_tokens):
    """The largest rank of one token's weight delta (per expert for stacked experts); None for
    bias and norm patches. Rank1 counts 1 where both factors are nonzero."""
    if isinstance(p, (Shift, Scale)):
        return None
    if hasattr(p, "u"):
        u, v = to_numpy(p.u), to_numpy(p.v)
        nz_u = np.any(u != 0, axis=-1)
        nz_v = np.any(v != 0, axis=-1)
        if nz_v.ndim < nz_u.ndim:
            nz_v = nz_v[:, None]
        return int(np.max(nz_u & nz_v)) if nz_u.size else 0
    d = to_numpy(p.d)
    per = max(1, CHUNK // max(1, d[0].size))
    return max(int(np.max(np.linalg.matrix_rank(d[s:s + per]))) for s in range(0, n_tokens, per))
