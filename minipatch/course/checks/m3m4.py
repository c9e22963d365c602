"""Unit m3m4: the vanilla blocks of Dherin et al. 2025 (MATH.md M3, M4), through real blocks."""
from __future__ import annotations

import numpy as np

from ...errors import NotControllableError
from ...patches import Rank1, Shift
from ..adapt import Dense, ReturnValueError, as_rank1
from .base import (TOL32, TOL64_BLOCK, TOL64_MODEL, check, close, dense, far, frozen, raises, rank, rng,
                   same_dtype, setup_far, unchanged)
from .harness import absorb_with, block_theorem, stream

U = "m3m4"
FAMILY = {"m3": "vanilla_m3", "m4": "vanilla_m4"}
CONTEXT = [1, 2, 3, 5, 8, 9]                       # not a prefix: token 0 precedes it


def vanilla_patch(impl, which, lp, noctx, ctx):
    """The layer patch of a vanilla block from the student's m3 (W) or m4 (W1 and b2)."""
    w = lp["up_proj.weight"]
    if which == "m3":
        return {"up_proj.weight": as_rank1(impl.m3(w, noctx["a"], ctx["a"]), "m3")}
    r = impl.m4(w, noctx["z"], ctx["z"])
    if not (isinstance(r, (tuple, list)) and len(r) in (2, 3)):
        raise ReturnValueError("m4 must return (u, v, d)")
    w_patch, d = (r[:2], r[2]) if len(r) == 3 else r        # (u, v, d) or (dense / Rank1, d)
    return {"up_proj.weight": as_rank1(w_patch, "m4"), "down_proj.bias": Shift(d)}


def model_of(which, seed=4, dtype=np.float64, n_layers=2):
    from ...models import tiny

    return tiny(FAMILY[which], seed=seed, n_layers=n_layers, dtype=dtype)


def block(impl, which, seed, layer, T=14, context=CONTEXT, dtype=np.float64):
    m = model_of(which, seed, dtype)
    tok = rng(seed).integers(0, 256, T)
    return block_theorem(m, layer, stream(m, tok, layer), context,
                         lambda nc, cx: vanilla_patch(impl, which, m.params["layers"][layer], nc, cx))


CASES = [dict(which="m3", seed=4, layer=0), dict(which="m4", seed=5, layer=1)]
HIDDEN = [dict(which="m3", seed=41, layer=1, T=20), dict(which="m4", seed=51, layer=0, T=9)]


@check(U, "exact64", public=CASES, hidden=HIDDEN)
def block_float64(impl, which, seed, layer, T=14):
    """The vanilla block theorem: the patched block without context == the block with context (float64)."""
    r = block(impl, which, seed, layer, T)
    setup_far(r.unpatched, r.target, "unpatched block")
    close(r.patched, r.target, TOL64_BLOCK, f"{which} block output")


@check(U, "exact64", public=[dict(which="m3"), dict(which="m4")], hidden=[dict(which="m4", seed=52)])
def model_float64(impl, which, seed=6):
    """Through a 3-layer vanilla model (M7 around the student's patches): logits to 1e-10."""
    from ..reference import m7

    m = model_of(which, seed, n_layers=3)
    tok = rng(seed).integers(0, 256, 12)
    r = absorb_with(m, tok, [1, 2, 4, 5, 7], m7,
                    lambda l, nc, cx: vanilla_patch(impl, which, m.params["layers"][l], nc, cx))
    setup_far(r.unpatched, r.target, "unpatched model")
    close(r.patched, r.target, TOL64_MODEL, f"{which} model logits")
    close(np.array([r.stream_err]), np.zeros(1), TOL64_MODEL, f"{which}: the worst layer's stream")


@check(U, "exact32", public=[dict(which="m3"), dict(which="m4")])
def block_float32(impl, which):
    """The vanilla block theorem in float32 (1e-4), the patch kept in float32."""
    r = block(impl, which, 7, 1, dtype=np.float32)
    same_dtype(r.patched, np.float32, "patched block output")
    close(r.patched, r.target, TOL32, f"{which} block output (float32)")


def _rolled(p):
    """Token t gets token t+1's patch."""
    if isinstance(p, Rank1):
        return Rank1(np.roll(p.u, -1, axis=0), np.roll(p.v, -1, axis=0))
    if isinstance(p, Shift):
        return Shift(np.roll(p.d, -1, axis=0))
    if isinstance(p, Dense):
        return Dense(np.roll(p.d, -1, axis=0))
    return p


@check(U, "control", public=CASES, hidden=HIDDEN[:1])
def null_and_specific(impl, which, seed, layer, T=14):
    """Token 0 precedes the context: its patch is zero; token t's patch fails token t+1."""
    from ...blocks import block_forward

    m = model_of(which, seed)
    r = block(impl, which, seed, layer, T)
    for name, p in r.patches.items():
        size = max(float(np.max(np.abs(p.dense(t)))) for t in range(p.n_tokens))
        if not float(np.max(np.abs(p.dense(0)))) <= TOL64_BLOCK * size:
            raise AssertionError(f"{name}: token 0 sees no context, yet its patch is not zero")
    kept = np.setdiff1d(np.arange(T), CONTEXT)
    x = stream(m, rng(seed).integers(0, 256, T), layer)[kept]
    rolled = {k: _rolled(p) for k, p in r.patches.items()}
    out = block_forward(m.spec, m.params["layers"][layer], x, m.cfg, layer, kept, patch=rolled)
    far(out[1:-1], r.target[1:-1], "the block with each token's patch moved to the previous token")


@check(U, "rank", public=CASES)
def rank_one(impl, which, seed, layer):
    """Each kept token after the context has a rank-1 patch of W (W1)."""
    r = block(impl, which, seed, layer)
    p = r.patches["up_proj.weight"]
    for t in range(1, p.n_tokens):
        k = rank(dense(p, t))
        if k != 1:
            raise AssertionError(f"kept token {t}: the patch of W has rank {k}, not 1")


@check(U, "min_norm", public=CASES)
def minimum_norm(impl, which, seed, layer):
    """The patch of W is the minimum-norm one: (W (a' - a)) a^+ (M1)."""
    m = model_of(which, seed)
    seen = {}

    def bp(nc, cx):
        seen.update(nc=nc, cx=cx)
        return vanilla_patch(impl, which, m.params["layers"][layer], nc, cx)
    tok = rng(seed).integers(0, 256, 14)
    r = block_theorem(m, layer, stream(m, tok, layer), CONTEXT, bp)
    key = "a" if which == "m3" else "z"
    a, a2 = seen["nc"][key], seen["cx"][key]
    w = m.params["layers"][layer]["up_proj.weight"]
    p = r.patches["up_proj.weight"]
    for t in range(1, a.shape[0]):
        want = (w @ (a2[t] - a[t]))[:, None] @ np.linalg.pinv(a[t][:, None])
        close(dense(p, t), want, 1e-10, f"kept token {t}: dW vs (W (a' - a)) a^+")


def _plain(which, seed=8):
    g = rng(seed)
    return g.standard_normal((7, 5)) / np.sqrt(5), g.standard_normal((3, 5)), g.standard_normal((3, 5))


@check(U, "errors", public=[dict(which="m3"), dict(which="m4")])
def zero_input(impl, which):
    """A zero attention output / MLP input row has no M1 witness: NotControllableError there."""
    w, a, a2 = _plain(which)
    a[1] = 0.0

    def at1(e):
        if e.position != 1:
            raise AssertionError(f"NotControllableError names position {e.position!r}, expected 1")
    raises(NotControllableError, getattr(impl, which), w, a, a2, what=f"{which} with a zero row 1", check=at1)


@check(U, "no_mutation", public=[dict(which="m3"), dict(which="m4")])
def no_mutation(impl, which):
    """m3 / m4 leave their inputs untouched."""
    arrs = _plain(which, 9)
    copies = frozen(*arrs)
    getattr(impl, which)(*arrs)
    unchanged(arrs, copies, ("w", "a (z)", "a_ctx (z_ctx)"))
