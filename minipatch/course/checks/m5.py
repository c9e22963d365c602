"""Unit m5: implicit learning dynamics (MATH.md M5; Dherin et al. 2025), on real block inputs."""
from __future__ import annotations

import numpy as np

from ...errors import InputError, NotControllableError
from ..adapt import as_array, as_steps, injected
from .base import (TOL32, TOL64_BLOCK, check, close, far, frozen, raises, rank, rng, same_dtype, setup_far,
                   unchanged)

U = "m5"


def block_rows(family="vanilla_m3", seed=3, n=8, dtype=np.float64):
    """(W, A [n+1, in]): a block's M1 weight and its inputs A_i for the prefixes c_1..c_i (one pass)."""
    from ...dynamics import first_block_dynamics
    from ...models import tiny

    m = tiny(family, seed=seed, n_layers=1)
    tok = rng(seed).integers(0, 256, n + 1)
    bd = first_block_dynamics(m, tok, query_positions="fixed" if family == "gpt2" else "append")
    name = next(iter(bd.steps))
    return np.asarray(m.params["layers"][0][name], dtype=dtype), np.asarray(bd.a, dtype=dtype)


def steps(impl, w, a):
    return as_steps(impl.implicit_steps(w, a), w, a, "implicit_steps")


def step(impl, w, a, i):
    return as_array(impl.gd_step(w, a, i), "gd_step")


def m1_dense(w, a0, ai):
    return np.outer(w @ (ai - a0), a0) / (a0 @ a0)


@check(U, "exact64", public=[dict(family="vanilla_m3")], hidden=[dict(family="gemma3", seed=5, n=11)])
def iterates_are_prefix_patches(impl, family, seed=3, n=8):
    """dW_i = u_i v^T is M1's patch of the prefix c_1..c_i, and dW_0 = 0 (float64)."""
    w, a = block_rows(family, seed, n)
    s = steps(impl, w, a)
    setup_far(w @ a[0], w @ a[-1], "A_0 vs A_n")
    for i in range(n + 1):
        got = np.outer(s.u[i], s.v)
        want = m1_dense(w, a[0], a[i])
        if i == 0:
            if np.any(got != 0):
                raise AssertionError("dW_0 must be exactly 0")
            continue
        close(got, want, TOL64_BLOCK, f"dW_{i} vs M1 of the prefix c_1..c_{i}")
    close(s.lr, 1.0 / (a[0] @ a[0]), TOL64_BLOCK, "lr = 1 / ||A_0||^2")


@check(U, "exact64", public=[dict(family="vanilla_m3")], hidden=[dict(family="gemma3", seed=6, n=5)])
def step_is_increment(impl, family, seed=4, n=6):
    """gd_step(i) = -h grad L_i = dW_i - dW_{i-1}, and the steps sum to dW_n (float64)."""
    w, a = block_rows(family, seed, n)
    s = steps(impl, w, a)
    total = np.zeros_like(w)
    for i in range(1, n + 1):
        g = step(impl, w, a, i)
        want = np.outer(w @ (a[i] - a[i - 1]), a[0]) / (a[0] @ a[0])
        close(g, want, TOL64_BLOCK, f"gd_step({i}) vs h W (A_i - A_(i-1)) A_0^T")
        total = total + g
    close(total, np.outer(s.u[n], s.v), 1e-11, "sum of the steps vs dW_n")


@check(U, "exact64", public=(), hidden=[dict(family="llama")])
def through_block_dynamics(impl, family):
    """The spine's block_dynamics on the student's implicit_steps: the M3 endpoint is exact."""
    from ...dynamics import first_block_dynamics
    from ...models import tiny
    from ...patches import Rank1

    m = tiny(family, seed=2, n_layers=1)
    with injected("m5", impl):
        bd = first_block_dynamics(m, rng(2).integers(0, 256, 7))
    p, inner = m.params["layers"][0], m.spec.inner
    a = bd.a
    patch = {k: Rank1(s.u[-1:], s.v[None, :]) for k, s in bd.steps.items()}
    close(inner.hidden(p, a[:1], m.cfg, patch), inner.hidden(p, a[-1:], m.cfg), TOL64_BLOCK,
          "f((W + dW_n) A_0) vs f(W A_n)")


@check(U, "exact32")
def float32(impl):
    """In float32 the iterates and steps keep float32 and hold to 1e-4."""
    w, a = block_rows(dtype=np.float32)
    s = steps(impl, w, a)
    same_dtype(s.u, np.float32, "u")
    g = step(impl, w, a, 3)
    same_dtype(g, np.float32, "gd_step")
    w64, a64 = w.astype(np.float64), a.astype(np.float64)
    close(np.outer(s.u[5], s.v), m1_dense(w64, a64[0], a64[5]), TOL32, "dW_5 (float32)")
    close(g, np.outer(w64 @ (a64[3] - a64[2]), a64[0]) / (a64[0] @ a64[0]), TOL32, "gd_step(3) (float32)")


@check(U, "control", public=[dict(seed=3)], hidden=[dict(seed=13)])
def null_step_and_motion(impl, seed):
    """A context token that does not move A gives a zero step; otherwise consecutive steps differ."""
    w, a = block_rows(seed=seed)
    a = np.concatenate([a[:3], a[2:3], a[3:]])             # A_3 = A_2
    if not np.max(np.abs(step(impl, w, a, 3))) <= 1e-14 * np.max(np.abs(step(impl, w, a, 2))):
        raise AssertionError("A_3 = A_2, yet gd_step(3) is not zero")
    far(step(impl, w, a, 4), step(impl, w, a, 2), "gd_step(4) vs gd_step(2)")


@check(U, "rank")
def steps_rank_one(impl):
    """Every step gd_step(i) has rank exactly 1 (one direction A_0 for all steps)."""
    w, a = block_rows()
    for i in range(1, a.shape[0]):
        r = rank(step(impl, w, a, i))
        if r != 1:
            raise AssertionError(f"gd_step({i}) has rank {r}, not 1")


@check(U, "min_norm")
def iterates_minimum_norm(impl):
    """Each dW_i is the minimum-norm solution of dW A_0 = W (A_i - A_0): (W (A_i - A_0)) A_0^+."""
    w, a = block_rows(seed=7)
    s = steps(impl, w, a)
    pinv = np.linalg.pinv(a[0][:, None])
    for i in (1, 4, a.shape[0] - 1):
        close(np.outer(s.u[i], s.v), (w @ (a[i] - a[0]))[:, None] @ pinv, 1e-10, f"dW_{i} vs its pinv form")


@check(U, "errors", public=[dict(fn="implicit_steps"), dict(fn="gd_step")])
def zero_query_input(impl, fn):
    """A_0 = 0 (a dead context-free input) has no M1 witness: NotControllableError."""
    w, a = block_rows()
    a = a.copy()
    a[0] = 0.0
    args = (w, a) if fn == "implicit_steps" else (w, a, 1)
    raises(NotControllableError, getattr(impl, fn), *args, what=f"{fn} with A_0 = 0")


@check(U, "errors", public=[dict(i=0)], hidden=[dict(i=9)])
def step_out_of_range(impl, i):
    """gd_step(i) exists for 1 <= i <= n only: InputError."""
    w, a = block_rows()
    raises(InputError, impl.gd_step, w, a, i, what=f"gd_step with i = {i} (n = {a.shape[0] - 1})")


@check(U, "no_mutation")
def no_mutation(impl):
    """implicit_steps and gd_step leave w and a untouched."""
    w, a = block_rows()
    copies = frozen(w, a)
    impl.implicit_steps(w, a)
    impl.gd_step(w, a, 2)
    unchanged((w, a), copies, ("w", "a"))
