"""Units m6a-m6d: the Gemma post-norm constructions (MATH.md M6), plain and through real blocks.

Plain cases call the construction on arrays (s, eps, h^C, m^C, delta) and check that the
patched post-norm outputs t = s * u^C + delta. Block and model cases inject the student's
construction into the spine (``m6.CONSTRUCTIONS``) and run the reference Gemma block and M7.
"""
from __future__ import annotations

import numpy as np

from ...errors import NotControllableError
from ...ops import rms_unit
from ...patches import Rank1, Scale
from ..adapt import Dense, as_array, as_m6, injected
from .base import (TOL32, TOL64_BLOCK, TOL64_MODEL, check, close, far, frozen, raises, rank, rng, same_dtype,
                   setup_far, unchanged)

EPS = 1e-6
NAMES = ("m6a", "m6b", "m6c", "m6d")


def case(seed, T=6, D=16, F=24, dtype=np.float64, delta_scale=0.5):
    """(s [D], h^C [T, F], m^C [T, D], delta [T, D]) at realistic scale, s away from 1."""
    g = rng(seed)
    s = np.exp(0.5 * g.standard_normal(D))
    h, w = g.standard_normal((T, F)), g.standard_normal((D, F)) / np.sqrt(F)
    m = h @ w.T
    delta = delta_scale * g.standard_normal((T, D))
    return tuple(x.astype(dtype) for x in (s, h, m, delta))


def construct(impl, name, s, h, m, delta, eps=EPS):
    return as_m6(getattr(impl, name)(s, eps, h, m, delta), name)


def output(p, s, h, m, eps=EPS):
    """The patched post-norm output (s + add) * mul * rms_unit(m'), m' the patched W_down output."""
    m2 = m if p.down is None else p.down.apply(h, m)
    return p.scale.multiplier(s) * rms_unit(m2, eps)


def goal(s, m, delta, eps=EPS):
    return s * rms_unit(m, eps) + delta


def each(fn, group, public=(None,), hidden=()):
    """Register ``fn(impl, name, **case)`` for every construction (one sub-unit each)."""
    for name in NAMES:
        check(name, group, [dict(name=name, **(c or {})) for c in public],
              [dict(name=name, **(c or {})) for c in hidden])(fn)
    return fn


def gemma(seed=7, n_layers=3, dtype=np.float64, family="gemma3"):
    from ...models import tiny

    return tiny(family, seed=seed, n_layers=n_layers, dtype=dtype)


# ---- exactness ------------------------------------------------------------------------------

def plain_float64(impl, name, seed):
    """The patched post-norm outputs t = s * u^C + delta exactly (float64, plain arrays)."""
    s, h, m, delta = case(seed)
    setup_far(s * rms_unit(m, EPS), goal(s, m, delta), "unpatched post-norm")
    close(output(construct(impl, name, s, h, m, delta), s, h, m), goal(s, m, delta), TOL64_BLOCK,
          f"{name}: post-norm output vs t")


each(plain_float64, "exact64", [dict(seed=0)], [dict(seed=10), dict(seed=11)])


def block_float64(impl, name, seed=7, layer=1, family="gemma3"):
    """The Gemma block theorem with the construction injected: patched block == with context."""
    from ...absorb import check_block
    from .harness import stream

    model = gemma(seed, family=family)
    tok = rng(0).integers(0, 256, 16)
    with injected(name, impl):
        r = check_block(model, layer, stream(model, tok, layer), [2, 3, 5, 8, 9, 13], name)
    setup_far(r.unpatched, r.with_context, "unpatched block")
    close(r.patched, r.with_context, TOL64_BLOCK, f"{name}: block output")


each(block_float64, "exact64", [None], [dict(seed=9, layer=0), dict(seed=10, layer=2, family="olmo2")])


def model_float64(impl, name, n_layers=4, seed=0):
    """Through a Gemma model (M7 on the reference, the construction injected): logits to 1e-10."""
    import minipatch as mp

    model = gemma(11, n_layers=n_layers)
    tok = rng(seed).integers(0, 256, 12)
    with injected(name, impl):
        res = mp.absorb(model, tok, [1, 2, 4, 5, 6, 9], method=name)
    want = model.forward(tok)[res.kept]
    setup_far(model.forward(tok[res.kept], positions=res.kept), want, "unpatched model")
    close(mp.patched_forward(model, tok, res), want, TOL64_MODEL, f"{name}: logits through {n_layers} layers")


each(model_float64, "exact64", [None], [dict(seed=3)])


@check("m6c", "exact64", [None])
def m6c_hard_case(impl):
    """M6c where t vanishes on the coordinates of smallest s (the trust region's hard case)."""
    g = rng(6)
    T, D, F = 3, 6, 10
    s = np.array([0.3, 0.3, 1.0, 1.5, 2.0, 2.5])
    h, w = g.standard_normal((T, F)), g.standard_normal((D, F))
    m = h @ w.T
    t = np.zeros((T, D))
    t[:, 2:] = 0.05 * g.standard_normal((T, D - 2))
    delta = t - s * rms_unit(m, EPS)
    p = construct(impl, "m6c", s, h, m, delta)
    close(output(p, s, h, m), t, TOL64_BLOCK, "m6c: post-norm output in the hard case")


def zero_multiplier(impl, name, seed=10):
    """1 + g = 0 at some coordinates (real Gemma 3 270M's post-FFW norms): still exact."""
    s, h, m, delta = case(seed, T=4, D=8, F=12)
    s[[1, 5]] = 0.0
    close(output(construct(impl, name, s, h, m, delta), s, h, m), goal(s, m, delta), TOL64_BLOCK,
          f"{name}: post-norm output where s has zeros")


for _n in ("m6c", "m6d"):
    check(_n, "exact64", [dict(name=_n)], [dict(name=_n, seed=12)])(zero_multiplier)


@check("m6d", "exact64", public=(), hidden=[None])
def m6d_well_conditioned(impl):
    """M6d under a 1e-13 perturbation of the hidden, with tiny multipliers and a large delta: error stays 1e-12."""
    g = rng(12)
    T, D, F = 8, 64, 96
    s = np.exp(0.5 * g.standard_normal(D))
    s[:4] = [1e-3, -2e-3, 5e-4, 1e-2]
    h, w = g.standard_normal((T, F)), g.standard_normal((D, F)) / np.sqrt(F)
    m = h @ w.T
    delta = 30.0 * g.standard_normal((T, D)) * g.standard_normal((1, D)) ** 2
    p = construct(impl, "m6d", s, h, m, delta)
    noisy = h * (1 + 1e-13 * g.standard_normal(h.shape))
    close(output(p, s, noisy, noisy @ w.T), goal(s, m, delta), TOL64_BLOCK, "m6d: output under perturbation")


@check("m6c", "exact64", [None], [dict(seed=15, D=3)])
def trust_region_optimal(impl, seed=5, D=8):
    """trust_region: mean(y^2) = 1 and the optimality conditions (s^2 - mu) y = s t with mu <= min(s^2)."""
    g = rng(seed)
    s = np.exp(0.5 * g.standard_normal(D))
    t = g.standard_normal((4, D))
    y = as_array(impl.trust_region(s, t), "trust_region")
    close(np.mean(y ** 2, axis=1), np.ones(4), TOL64_BLOCK, "mean(y^2)")
    grad = s * s * y - s * t                                     # = mu y at a constrained minimum
    mu = np.sum(grad * y, -1, keepdims=True) / np.sum(y * y, -1, keepdims=True)
    close(grad, mu * y, 1e-10, "stationarity: s^2 y - s t vs mu y")
    if not np.all(mu[:, 0] <= np.min(s * s) * (1 + 1e-12)):
        raise AssertionError("a stationary point with mu > min(s^2): not the minimiser")


@check("m6c", "exact64", [None])
def trust_region_hard_case(impl):
    """trust_region's hard case: mu = min(s^2), free coordinates filled (MATH.md M6c)."""
    s = np.array([0.5, 0.5, 1.0, 2.0, 3.0])
    t = np.array([[0.0, 0.0, 0.1, 0.2, -0.1]])
    y = as_array(impl.trust_region(s, t), "trust_region")
    close(np.mean(y ** 2), 1.0, TOL64_BLOCK, "mean(y^2) in the hard case")
    close(y[0, 2:], s[2:] * t[0, 2:] / (s[2:] ** 2 - 0.25), TOL64_BLOCK, "y = s t / (s^2 - min s^2)")


def block_float32(impl, name):
    """The Gemma block theorem in float32 (1e-4), float32 kept."""
    from ...absorb import check_block
    from .harness import stream

    model = gemma(3, n_layers=2, dtype=np.float32)
    tok = rng(1).integers(0, 256, 20)
    with injected(name, impl):
        r = check_block(model, 1, stream(model, tok, 1), np.arange(1, 12), name)
    same_dtype(r.patched, np.float32, "patched block output")
    close(r.patched, r.with_context, TOL32, f"{name}: block output (float32)")


each(block_float32, "exact32")


# ---- negative controls ----------------------------------------------------------------------

def _roll(p):
    def r(x):
        return None if x is None else np.roll(x, -1, axis=0)
    d = p.down
    if isinstance(d, Rank1):
        d = Rank1(r(d.u), r(d.v))
    elif isinstance(d, Dense):
        d = Dense(r(d.d))
    return type(p)(d, Scale(r(p.scale.add), r(p.scale.mul)))


def null_and_specific(impl, name, seed=1):
    """delta = 0 leaves the output unchanged; token t's patch fails token t+1."""
    s, h, m, delta = case(seed)
    zero = np.zeros_like(delta)
    p0 = construct(impl, name, s, h, m, zero)
    close(output(p0, s, h, m), s * rms_unit(m, EPS), TOL64_BLOCK, f"{name} with delta = 0")
    if name == "m6a" and np.any(p0.scale.add != 0):
        raise AssertionError("m6a with delta = 0 must patch nothing (dg = 0)")
    p = construct(impl, name, s, h, m, delta)
    far(output(_roll(p), s, h, m)[:-1], goal(s, m, delta)[:-1], f"{name}: token t+1's patch on token t")


each(null_and_specific, "control", [None], [dict(seed=21)])


# ---- structure ------------------------------------------------------------------------------

SHAPES = {"m6a": (False, True, False), "m6b": (True, False, True), "m6c": (True, True, False),
          "m6d": (True, True, False)}


def structure(impl, name):
    """What the construction patches: W_down (rank 1) or not, an elementwise or a per-token scale."""
    s, h, m, delta = case(2)
    p = construct(impl, name, s, h, m, delta)
    down, add, mul = SHAPES[name]
    if (p.down is not None) != down:
        raise AssertionError(f"{name} {'patches' if down else 'leaves'} W_down; got the opposite")
    if (p.scale.add is not None) != add or (p.scale.mul is not None) != mul:
        raise AssertionError(f"{name}'s scale patch is {'elementwise [T, D]' if add else 'one scalar per token [T, 1]'}")
    if add and tuple(p.scale.add.shape) != m.shape:
        raise AssertionError(f"the elementwise scale has shape {tuple(p.scale.add.shape)}, expected {m.shape}")
    if mul and tuple(p.scale.mul.shape) != (m.shape[0], 1):
        raise AssertionError(f"the per-token scale has shape {tuple(p.scale.mul.shape)}, expected ({m.shape[0]}, 1)")
    if down:
        for t in range(m.shape[0]):
            if rank(p.down.dense(t)) != 1:
                raise AssertionError(f"token {t}: the W_down patch has rank {rank(p.down.dense(t))}, not 1")
    if name == "m6d":   # above the floor dg_i = s_i (R - 1), one R per token
        big = np.abs(s) > 0.1 * np.sqrt(np.mean(s ** 2))
        ratio = p.scale.add[:, big] / s[big]
        close(ratio, ratio[:, :1] * np.ones_like(ratio), 1e-9, "m6d: dg / s above the floor (one R per token)")


each(structure, "rank")


# ---- named errors ---------------------------------------------------------------------------

@check("m6a", "errors", [dict(value=0.0)], [dict(value=1e-300)])
def m6a_zero_coordinate(impl, value):
    """M6a divides by every coordinate of u^C: a zero one has no witness (NotControllableError)."""
    s, h, m, delta = case(8, T=2, D=6, F=5)
    m = m.copy()
    m[0, 3] = value

    def at0(e):
        if e.position != 0:
            raise AssertionError(f"NotControllableError names position {e.position!r}, expected 0")
    raises(NotControllableError, impl.m6a, s, EPS, h, m, delta, what=f"m6a with u^C[0, 3] = {value}", check=at0)


@check("m6b", "errors", [None])
def m6b_zero_multiplier(impl):
    """M6b divides by s = 1 + g: an entry 0 has no witness (NotControllableError)."""
    s, h, m, delta = case(9, D=4)
    s[1] = 0.0
    raises(NotControllableError, impl.m6b, s, EPS, h, m, delta, what="m6b with s[1] = 0")


def zero_hidden(impl, name):
    """M2 on W_down needs h^C != 0: a zero hidden row has no witness (NotControllableError)."""
    s, h, m, delta = case(13)
    h = h.copy()
    h[2] = 0.0
    raises(NotControllableError, getattr(impl, name), s, EPS, h, m, delta, what=f"{name} with h^C[2] = 0")


for _n in ("m6b", "m6c", "m6d"):
    check(_n, "errors", [dict(name=_n)])(zero_hidden)


# ---- no mutation ----------------------------------------------------------------------------

def no_mutation(impl, name):
    """The construction leaves s, h^C, m^C and delta untouched."""
    arrs = case(14)
    copies = frozen(*arrs)
    s, h, m, delta = arrs
    getattr(impl, name)(s, EPS, h, m, delta)
    unchanged(arrs, copies, ("s", "h_ctx", "m_ctx", "delta"))


each(no_mutation, "no_mutation")


@check("m6c", "no_mutation")
def trust_region_no_mutation(impl):
    """trust_region leaves s and t untouched."""
    s, _, _, t = case(15)
    copies = frozen(s, t)
    impl.trust_region(s, t)
    unchanged((s, t), copies, ("s", "t"))
