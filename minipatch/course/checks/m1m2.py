"""Unit m1m2: the absorption lemmas (MATH.md M1, M2)."""
from __future__ import annotations

import numpy as np

from ...errors import NotControllableError
from ..adapt import as_rank1
from .base import (TOL32, TOL64_BLOCK, check, close, dense, far, frozen, raises, rank, rng, same_dtype, setup_far,
                   unchanged)

U = "m1m2"


def draw(seed, T, out, inp, dtype=np.float64, scale=1.0):
    """W [out, in] at realistic scale, inputs a, a' [T, in] (a' far from a)."""
    g = rng(seed)
    w = g.standard_normal((out, inp)) / np.sqrt(inp)
    a = scale * g.standard_normal((T, inp))
    a2 = scale * g.standard_normal((T, inp))
    return w.astype(dtype), a.astype(dtype), a2.astype(dtype)


def m1_patch(impl, w, a, a_ctx):
    return as_rank1(impl.m1(w, a, a_ctx), "m1")


def m2_patch(impl, h, delta):
    return as_rank1(impl.m2(h, delta), "m2")


# ---- exactness ------------------------------------------------------------------------------

@check(U, "exact64", public=[dict(seed=0, T=4, out=6, inp=5)],
       hidden=[dict(seed=101, T=1, out=1, inp=1), dict(seed=102, T=9, out=3, inp=12),
               dict(seed=103, T=3, out=7, inp=4, scale=1e3)])
def m1_identity(impl, seed, T, out, inp, scale=1.0):
    """M1: (W + dW_t) a_t = W a'_t for every token, float64."""
    w, a, a2 = draw(seed, T, out, inp, scale=scale)
    p = m1_patch(impl, w, a, a2)
    setup_far(a @ w.T, a2 @ w.T, "unpatched")
    close(p.apply(a, a @ w.T), a2 @ w.T, TOL64_BLOCK, "(W + dW) a vs W a'")


@check(U, "exact64", public=[dict(seed=1, T=4, out=6, inp=5)],
       hidden=[dict(seed=111, T=1, out=1, inp=1), dict(seed=112, T=8, out=12, inp=3)])
def m2_identity(impl, seed, T, out, inp):
    """M2: (W + dW_t) h_t = W h_t + delta_t for every token, float64."""
    w, h, _ = draw(seed, T, out, inp)
    delta = rng(seed + 1).standard_normal((T, out))
    p = m2_patch(impl, h, delta)
    setup_far(h @ w.T, h @ w.T + delta, "unpatched")
    close(p.apply(h, h @ w.T), h @ w.T + delta, TOL64_BLOCK, "(W + dW) h vs W h + delta")


@check(U, "exact64", public=[dict(family="llama")], hidden=[dict(family="gemma3")])
def m1_in_a_gated_mlp(impl, family):
    """M1 on W_gate and W_up of a gated MLP gives the with-context hidden (MATH.md M8 table)."""
    from ...models import tiny

    m = tiny(family, seed=3, n_layers=1)
    p, inner = m.params["layers"][0], m.spec.inner
    g = rng(4)
    n = inner.normalize(p, g.standard_normal((5, m.cfg.d_model)), m.cfg)
    n_ctx = inner.normalize(p, g.standard_normal((5, m.cfg.d_model)), m.cfg)
    patch = {k + ".weight": m1_patch(impl, p[k + ".weight"], n, n_ctx) for k in inner.reads(p)}
    want = inner.hidden(p, n_ctx, m.cfg)
    setup_far(inner.hidden(p, n, m.cfg), want, "unpatched hidden")
    close(inner.hidden(p, n, m.cfg, patch), want, TOL64_BLOCK, "patched hidden vs with-context hidden")


@check(U, "exact32", public=[dict(seed=2)], hidden=[dict(seed=121)])
def m1_float32(impl, seed):
    """M1 in float32: (W + dW) a = W a' to 1e-4, u and v stay float32."""
    w, a, a2 = draw(seed, 5, 8, 6, np.float32)
    p = m1_patch(impl, w, a, a2)
    same_dtype(p.apply(a, a @ w.T), np.float32, "(W + dW) a")
    close(p.apply(a, a @ w.T), a2 @ w.T, TOL32, "(W + dW) a vs W a' (float32)")


@check(U, "exact32", public=[dict(seed=3)], hidden=[dict(seed=131)])
def m2_float32(impl, seed):
    """M2 in float32: (W + dW) h = W h + delta to 1e-4, float32 kept."""
    w, h, _ = draw(seed, 5, 8, 6, np.float32)
    delta = rng(seed + 1).standard_normal((5, 8)).astype(np.float32)
    p = m2_patch(impl, h, delta)
    same_dtype(p.apply(h, h @ w.T), np.float32, "(W + dW) h")
    close(p.apply(h, h @ w.T), h @ w.T + delta, TOL32, "(W + dW) h vs W h + delta (float32)")


# ---- negative controls ----------------------------------------------------------------------

@check(U, "control", public=[dict(seed=4)], hidden=[dict(seed=141)])
def m1_null_and_specific(impl, seed):
    """M1: a token the context does not move gets no patch; token t's patch fails token t+1."""
    w, a, a2 = draw(seed, 4, 6, 5)
    a2[1] = a[1]
    p = m1_patch(impl, w, a, a2)
    if not np.max(np.abs(dense(p, 1))) <= 1e-14 * np.max(np.abs(w)):
        raise AssertionError("a' = a at token 1, yet its patch is not zero")
    for t in (0, 2):
        far((w + dense(p, t + 1)) @ a[t], w @ a2[t], f"token {t + 1}'s patch applied to token {t}")


@check(U, "control", public=[dict(seed=5)], hidden=[dict(seed=151)])
def m2_null_and_specific(impl, seed):
    """M2: delta_t = 0 gives no patch; token t's patch fails token t+1."""
    w, h, _ = draw(seed, 4, 6, 5)
    delta = rng(seed).standard_normal((4, 6))
    delta[2] = 0.0
    p = m2_patch(impl, h, delta)
    if not np.max(np.abs(dense(p, 2))) == 0.0:
        raise AssertionError("delta = 0 at token 2, yet its patch is not zero")
    for t in (0, 1):
        far((w + dense(p, t + 1)) @ h[t], w @ h[t] + delta[t], f"token {t + 1}'s patch applied to token {t}")


# ---- rank and minimum norm ------------------------------------------------------------------

@check(U, "rank", public=[dict(seed=6)], hidden=[dict(seed=161)])
def m1_m2_rank_one(impl, seed):
    """Every token's M1 and M2 patch has rank exactly 1."""
    w, a, a2 = draw(seed, 4, 6, 5)
    for name, p in (("m1", m1_patch(impl, w, a, a2)), ("m2", m2_patch(impl, a, a2[:, :4] + 1.0))):
        for t in range(4):
            r = rank(dense(p, t))
            if r != 1:
                raise AssertionError(f"{name}: token {t}'s patch has rank {r}, not 1")


def pinv_patch(resid, x):
    """residual @ pinv(x): the minimum-norm dW with dW x = resid."""
    return resid[:, None] @ np.linalg.pinv(x[:, None])


@check(U, "min_norm", public=[dict(seed=7)], hidden=[dict(seed=171)])
def m1_minimum_norm(impl, seed):
    """M1's dW_t is the minimum-Frobenius-norm solution: residual @ pinv(a_t)."""
    w, a, a2 = draw(seed, 3, 6, 5)
    p = m1_patch(impl, w, a, a2)
    for t in range(3):
        close(dense(p, t), pinv_patch(w @ (a2[t] - a[t]), a[t]), 1e-10, f"token {t}: dW vs (W (a' - a)) a^+")


@check(U, "min_norm", public=[dict(seed=8)], hidden=[dict(seed=181)])
def m2_minimum_norm(impl, seed):
    """M2's dW_t is the minimum-Frobenius-norm solution: delta_t @ pinv(h_t)."""
    _, h, _ = draw(seed, 3, 6, 5)
    delta = rng(seed).standard_normal((3, 7))
    p = m2_patch(impl, h, delta)
    for t in range(3):
        close(dense(p, t), pinv_patch(delta[t], h[t]), 1e-10, f"token {t}: dW vs delta h^+")


# ---- named errors ---------------------------------------------------------------------------

def _at(position):
    def ok(e):
        if e.position != position:
            raise AssertionError(f"NotControllableError names position {e.position!r}, expected {position}")
    return ok


@check(U, "errors", public=[dict(row=1, value=0.0)], hidden=[dict(row=0, value=0.0), dict(row=2, value=1e-170)])
def m1_zero_input(impl, row, value):
    """M1 has no witness where a_t = 0 (or underflows): NotControllableError at that token."""
    w, a, a2 = draw(9, 3, 4, 5)
    a[row] = value
    raises(NotControllableError, impl.m1, w, a, a2, what=f"m1 with a[{row}] = {value}", check=_at(row))


@check(U, "errors", public=[dict(row=2)], hidden=[dict(row=0)])
def m2_zero_input(impl, row):
    """M2 has no witness where h_t = 0 (a dead hidden): NotControllableError at that token."""
    _, h, _ = draw(10, 3, 4, 5)
    h[row] = 0.0
    raises(NotControllableError, impl.m2, h, np.ones((3, 4)), what=f"m2 with h[{row}] = 0", check=_at(row))


# ---- no mutation ----------------------------------------------------------------------------

@check(U, "no_mutation")
def m1_no_mutation(impl):
    """m1 leaves w, a and a_ctx untouched."""
    arrs = draw(11, 3, 4, 5)
    copies = frozen(*arrs)
    impl.m1(*arrs)
    unchanged(arrs, copies, ("w", "a", "a_ctx"))


@check(U, "no_mutation")
def m2_no_mutation(impl):
    """m2 leaves h and delta untouched."""
    _, h, d = draw(12, 3, 4, 5)
    copies = frozen(h, d)
    impl.m2(h, d)
    unchanged((h, d), copies, ("h", "delta"))
