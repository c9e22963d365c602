"""Wrong implementations of the block-level units: m6a-m6d, m7, m8."""
from __future__ import annotations

import numpy as np

from ...errors import NotControllableError
from ...m6 import _down_then_scale
from ...ops import rms_unit
from .. import reference as R
from . import mutant

# ---- m6 -------------------------------------------------------------------------------------


def _no_eps(name):
    return lambda s, eps, h, m, delta: getattr(R, name)(s, 0.0, h, m, delta)


def _f64(name):
    return lambda s, eps, h, m, delta: getattr(R, name)(*(x.astype(np.float64) for x in (s,)), eps,
                                                        *(x.astype(np.float64) for x in (h, m, delta)))


def _t_in_place(name):
    """Builds t by adding into delta (t = delta; t += s u^C), then the right construction."""
    def wrong(s, eps, h, m, delta):
        out = getattr(R, name)(s, eps, h, m, delta.copy())
        t = delta
        t += s * rms_unit(m, eps)
        return out
    return wrong


def _hides_dead_hidden(name):
    """Guards ||h||^2 with + 1e-30 instead of raising: a dead hidden gets a silent zero patch."""
    def wrong(s, eps, h, m, delta):
        dead = np.sum(h * h, axis=-1, keepdims=True) == 0
        down, add, mul = getattr(R, name)(s, eps, np.where(dead, 1.0, h), m, delta)
        return (down[0], h / (np.sum(h * h, axis=-1, keepdims=True) + 1e-30)), add, mul
    return wrong


def _m6a_tiny(s, eps, h, m, delta):
    return None, delta / (rms_unit(m, eps) + 1e-12), None


def _m6b_elementwise(s, eps, h, m, delta):
    down, _, mul = R.m6b(s, eps, h, m, delta)
    return down, s * (mul - 1.0), None


def _m6b_guarded(s, eps, h, m, delta):
    return R.m6b(np.where(s == 0, 1.0, s), eps, h, m, delta)


def _m6b_forgets_s(s, eps, h, m, delta):
    t = s * rms_unit(m, eps) + delta
    return R.m2(h, t - m), None, np.sqrt(np.mean(t * t, axis=-1, keepdims=True) + eps)


def _trust_region_no_hard_case(s, t):
    """Bisection for the secular equation on mu < min(s^2) only (the hard case is ignored)."""
    s2 = s * s
    c = (t * s) ** 2
    lo = np.full(t.shape[0], s2.min() - np.sqrt(np.mean(c, -1)) - 1.0)
    hi = np.full(t.shape[0], s2.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        phi = np.mean(c / (s2[None] - mid[:, None]) ** 2, -1)
        lo, hi = np.where(phi < 1, mid, lo), np.where(phi < 1, hi, mid)
    return s * t / (s2[None] - lo[:, None])


def _m6c_with(trust):
    def m6c(s, eps, h, m, delta):
        t = s * rms_unit(m, eps) + delta
        y = trust(np.where(s == 0, 1.0, s), t)
        rho = np.sqrt(np.mean(m * m, axis=-1, keepdims=True))
        p = _down_then_scale(s, eps, t, h, m, rho * y)
        return (p.down.u, p.down.v), p.scale.add, None
    return m6c


def _m6c_zeros_kept(s, eps, h, m, delta):
    t = s * rms_unit(m, eps) + delta
    rho = np.sqrt(np.mean(m * m, axis=-1, keepdims=True))
    p = _down_then_scale(s, eps, t, h, m, rho * R.trust_region(s, t))
    return (p.down.u, p.down.v), p.scale.add, None


def _tr_in_place(s, t):
    y = R.trust_region(s, t)
    t /= np.sqrt(np.mean(t * t, axis=-1, keepdims=True))
    return y


def _m6d_no_floor(s, eps, h, m, delta):
    t = s * rms_unit(m, eps) + delta
    y = t / s
    rho = np.sqrt(np.mean(m * m, axis=-1, keepdims=True))
    p = _down_then_scale(s, eps, t, h, m, rho * y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True)))
    return (p.down.u, p.down.v), p.scale.add, None


for _n in ("m6a", "m6b", "m6c", "m6d"):
    mutant(_n, f"{_n} without the norm's eps", "exact64", **{_n: _no_eps(_n)})
    mutant(_n, f"{_n} in float64 whatever the input", "exact32", **{_n: _f64(_n)})
    mutant(_n, f"{_n} builds t = s u^C + delta in delta's memory", "no_mutation", **{_n: _t_in_place(_n)})
for _n in ("m6b", "m6c", "m6d"):
    mutant(_n, f"{_n} hides a dead hidden with + 1e-30", "errors", **{_n: _hides_dead_hidden(_n)})
def _multiplier(name):
    def wrong(s, eps, h, m, delta):
        down, add, mul = getattr(R, name)(s, eps, h, m, delta)
        return down, s + add, mul                   # the new multiplier, not its change
    return wrong


for _n in ("m6a", "m6c", "m6d"):
    mutant(_n, f"{_n} returns the patched multiplier s + dg, not dg", "control", **{_n: _multiplier(_n)})
mutant("m6a", "m6a hides a zero coordinate with u^C + 1e-12", "errors", m6a=_m6a_tiny)
mutant("m6a", "m6a implemented as m6d (patches W_down too)", "rank", m6a=R.m6d)
mutant("m6b", "m6b's scalar written as an elementwise patch", "rank", m6b=_m6b_elementwise)
mutant("m6b", "m6b guards s = 0 with 1 instead of raising", "errors", m6b=_m6b_guarded)
mutant("m6b", "m6b sends W_down to t, not t / s", "exact64", m6b=_m6b_forgets_s)
mutant("m6c", "m6c implemented as m6b (one scalar per token)", "rank", m6c=R.m6b)
mutant("m6c", "trust region without the hard case", "exact64", trust_region=_trust_region_no_hard_case,
       m6c=_m6c_with(_trust_region_no_hard_case))
mutant("m6c", "m6c solves the trust region with the zero multipliers kept", "exact64", m6c=_m6c_zeros_kept)
mutant("m6c", "trust region answered with M6d's direction (t / s, normalised)", "exact64",
       trust_region=lambda s, t: (t / s) / np.sqrt(np.mean((t / s) ** 2, axis=-1, keepdims=True)))
mutant("m6c", "trust region rescales t in place", "no_mutation", trust_region=_tr_in_place)
mutant("m6d", "m6d without the floor (y = t / s)", "exact64", m6d=_m6d_no_floor)
mutant("m6d", "m6d implemented as m6c (the trust-region direction)", "rank", m6d=R.m6c)

# ---- m7 -------------------------------------------------------------------------------------


def _m7(attend_all=False, layer_shift=0, open_loop=False, renumber=False, swallow=False, cache=False,
        upcast=False):
    def m7(ctx, kept, attention, block_patch, mlp):
        L = len(ctx)
        x = ctx[0]["x"][kept]
        if upcast:
            x = x.astype(np.float64)
        patches = []
        for l in range(L):
            values = ctx[min(max(l + layer_shift, 0), L - 1)]
            rows = {k: v[kept] for k, v in values.items()}
            if cache:
                values.update(rows)             # caches the kept rows in the caller's dict
            if attend_all:
                T = ctx[l]["x"].shape[0]
                a, z = attention(l, ctx[l]["x"], np.arange(T))
                a, z = a[kept], z[kept]
            else:
                a, z = attention(l, x, np.arange(len(kept)) if renumber else kept)
            try:
                patch = block_patch(l, {"x": x, "a": a, "z": z}, rows)
            except NotControllableError:
                if not swallow:
                    raise
                patch = {}
            x = rows["out"] if open_loop else mlp(l, x, a, z, patch)
            patches.append(patch)
        return patches
    return m7


mutant("m7", "attends over the context tokens in the patched run", "exact64", m7=_m7(attend_all=True))
mutant("m7", "patch of layer l from layer l+1's activations", "control", m7=_m7(layer_shift=1))
mutant("m7", "open loop: each layer built on X_l^C, not the patched stream", "exact32", m7=_m7(open_loop=True))
mutant("m7", "kept tokens renumbered 0..T_K-1 (loses positions)", "exact64", m7=_m7(renumber=True))
mutant("m7", "skips a layer without a witness", "errors", m7=_m7(swallow=True))
mutant("m7", "caches the kept rows in ctx", "no_mutation", m7=_m7(cache=True))
mutant("m7", "stream in float64", "exact32", m7=_m7(upcast=True))

# ---- m8 -------------------------------------------------------------------------------------


def _moe(scale_all=None, one_as_all=False, guard=False, lenient=False, per_k=False, every=False):
    def witness(gates, experts, delta, method="one"):
        if method not in ("one", "all") and not lenient:
            return R.moe_outer_witness(gates, experts, delta, method)
        method = "all" if (one_as_all or method not in ("one", "all")) else method
        if guard:
            experts = np.where(np.sum(experts ** 2, -1, keepdims=True) == 0, 1.0, experts)
        if method == "all":
            on = gates != 0
            S = np.sum(gates, -1, keepdims=True) if scale_all is None else scale_all
            if per_k:                        # spread delta evenly over the k active experts, gates ignored
                S = np.sum(on, -1, keepdims=True)
            if every:                        # also the experts the token does not select (gate 0)
                on = np.ones_like(on)
            hs = np.where(on[..., None], experts / np.sum(experts ** 2, -1, keepdims=True), 0.0)
            return (on / S)[..., None] * delta[:, None, :], hs
        return R.moe_outer_witness(gates, experts, delta, method)
    return witness


def _moe_one_no_gate(gates, experts, delta, method="one"):
    u, v = R.moe_outer_witness(gates, experts, delta, method)
    if method == "one":
        w = np.max(gates, -1)[:, None, None]
        u = u * w
    return u, v


def _inner(v_of, guard=False, in_place=False):
    def witness(weights, n, n_ctx):
        if in_place:
            n_ctx -= n
            d = n_ctx
        else:
            d = n_ctx - n
        sq = np.sum(n * n, -1, keepdims=True) + (1e-30 if guard else 0.0)
        if not guard and np.any(sq == 0):
            return R.inner_witness(weights, n, n + d)
        out = {}
        for k, w in weights.items():
            u = d @ np.swapaxes(w, -1, -2)
            out[k] = (np.swapaxes(u, 0, 1) if u.ndim == 3 else u, v_of(n, n + d, sq))
        return out
    return witness


def _m8(outer_at_z=False, always_inner=False, upcast=False):
    def m8(input_witness, output_witness, f, z, z_ctx, delta):
        if upcast:
            z, z_ctx, delta = (None if x is None else x.astype(np.float64) for x in (z, z_ctx, delta))
        patch = dict(input_witness(z, z_ctx)) if (z_ctx is not None or always_inner) else {}
        if delta is None and not always_inner:
            return patch
        patch.update(output_witness(f(z if (z_ctx is None or outer_at_z) else z_ctx), delta))
        return patch
    return m8


def _m8_target(input_witness, output_witness, f, z, z_ctx, delta):
    """Passes the with-context target output z^C + delta instead of delta."""
    patch = dict(input_witness(z, z_ctx)) if z_ctx is not None else {}
    if delta is not None:
        patch.update(output_witness(f(z if z_ctx is None else z_ctx), (z if z_ctx is None else z_ctx) + delta))
    return patch


def _check_in_zero(f, witness, z, z_target):
    return 0.0, witness(z, z_target)


def _check_out_no_delta(g, witness, h, delta):
    patch = witness(h, delta)
    return float(np.max(np.abs(g(h, patch) - g(h)))), patch


mutant("m8", "MoE 'all' assumes the gate sum S = 1", "exact64", moe_outer_witness=_moe(scale_all=1.0))
mutant("m8", "MoE 'one' forgets to divide by the gate w_e", "exact64", moe_outer_witness=_moe_one_no_gate)
mutant("m8", "MoE 'one' implemented as 'all'", "rank", moe_outer_witness=_moe(one_as_all=True))
mutant("m8", "MoE 'all' gives each active expert delta / k (ignores the gates)", "exact64", moe_outer_witness=_moe(per_k=True))
mutant("m8", "MoE 'all' patches every expert, selected or not", "rank", moe_outer_witness=_moe(every=True))
mutant("m8", "inner witness with another exact v for each weight", "rank",
       inner_witness=lambda weights, n, n_ctx: {k: (r[0], (n if i % 2 else n_ctx) / np.sum(n * (n if i % 2 else n_ctx),
                                                                                        -1, keepdims=True))
                                                for i, (k, r) in enumerate(R.inner_witness(weights, n, n_ctx).items())})
mutant("m8", "MoE witness guards a dead expert hidden", "errors", moe_outer_witness=_moe(guard=True))
mutant("m8", "MoE witness treats an unknown method as 'all'", "errors", moe_outer_witness=_moe(lenient=True))
mutant("m8", "inner witness normalised by ||n||", "exact64",
       inner_witness=_inner(lambda n, nc, sq: n / np.sqrt(sq)))
mutant("m8", "inner witness with v = n^C / (n . n^C) (exact, not minimum norm)", "min_norm",
       inner_witness=_inner(lambda n, nc, sq: nc / np.sum(n * nc, -1, keepdims=True)))
mutant("m8", "inner witness hides a zero input with + 1e-30", "errors",
       inner_witness=_inner(lambda n, nc, sq: n / sq, guard=True))
mutant("m8", "inner witness computes n^C - n in place", "no_mutation",
       inner_witness=_inner(lambda n, nc, sq: n / sq, in_place=True))
mutant("m8", "M8's outer witness at f(z), not f(z^C) (the wrong activations)", "exact64", m8=_m8(outer_at_z=True))
mutant("m8", "M8 always builds both witnesses (parallel blocks, M3)", "exact64", m8=_m8(always_inner=True))
mutant("m8", "M8 passes the target z^C + delta instead of delta", "control", m8=_m8_target)
mutant("m8", "M8 in float64 whatever the input", "exact32", m8=_m8(upcast=True))
mutant("m8", "check_input_controllable that always reports 0", "control", check_input_controllable=_check_in_zero)
mutant("m8", "check_output_controllable compares with g(h), forgetting + delta", "exact64",
       check_output_controllable=_check_out_no_delta)
