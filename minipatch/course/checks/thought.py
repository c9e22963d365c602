"""Unit thought: least-squares thought vectors and matrices (MATH.md section 6)."""
from __future__ import annotations

import warnings

import numpy as np

from ...errors import InputError, ShapeError
from ..adapt import as_array
from .base import TOL32, TOL64_BLOCK, check, close, far, frozen, raises, rng, same_dtype, setup_far, unchanged

U = "thought"


def dw_of(impl, a, r, w, ridge=0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return as_array(impl.thought_matrix(a, r, w, ridge), "thought_matrix", "dw")


def delta_of(impl, y_ctx, y):
    return as_array(impl.thought_vector(y_ctx, y), "thought_vector", "delta")


def calib(seed, T, out=7, inp=12, dtype=np.float64):
    g = rng(seed)
    w = g.standard_normal((out, inp)) / np.sqrt(inp)
    a = g.standard_normal((T, inp))
    a_ctx = a + g.standard_normal((T, inp))
    return w.astype(dtype), a.astype(dtype), (a_ctx @ w.T).astype(dtype), a_ctx.astype(dtype)


@check(U, "exact64", public=[dict(T=1), dict(T=5)], hidden=[dict(T=12), dict(T=3, seed=9)])
def matrix_exact_for_independent_inputs(impl, T, seed=2):
    """T <= in independent tokens: W + dW* maps every a_t to its target (float64); T = 1 is M1's patch."""
    from ...lemmas import m1

    w, a, r, a_ctx = calib(seed, T)
    dw = dw_of(impl, a, r, w)
    setup_far(a @ w.T, r, "unpatched outputs")
    close(a @ (w + dw).T, r, TOL64_BLOCK, "(W + dW*) a_t vs the targets")
    if T == 1:
        close(dw, m1(w, a, a_ctx).dense(0), TOL64_BLOCK, "one token: dW* vs M1's patch")


@check(U, "exact64", public=[dict(ridge=0.0)], hidden=[dict(ridge=0.5), dict(ridge=0.0, T=40)])
def matrix_overdetermined_fit(impl, ridge, T=20):
    """More tokens than inputs: dW* is the least-squares fit (ridge: (A^T A + ridge I)^-1 A^T E)."""
    g = rng(3)
    w, a, r = g.standard_normal((4, 6)), g.standard_normal((T, 6)), g.standard_normal((T, 4))
    e = r - a @ w.T
    want = (np.linalg.lstsq(a, e, rcond=None)[0] if ridge == 0
            else np.linalg.solve(a.T @ a + ridge * np.eye(6), a.T @ e)).T
    close(dw_of(impl, a, r, w, ridge), want, 1e-10, f"dW* vs the least-squares solution (ridge {ridge})")


@check(U, "exact64", public=[None], hidden=[dict(T=1, seed=8)])
def vector_is_mean_shift(impl, T=9, seed=0):
    """delta* = mean_t (y^C_t - y_t); a constant shift is recovered exactly."""
    g = rng(seed)
    y = g.standard_normal((T, 5))
    yc = y + g.standard_normal((T, 5))
    close(delta_of(impl, yc, y), (yc - y).mean(0), TOL64_BLOCK, "delta* vs mean(y^C - y)")
    close(delta_of(impl, y + 2.0, y), np.full(5, 2.0), TOL64_BLOCK, "a constant shift of 2")


@check(U, "exact32", public=[None])
def float32(impl):
    """In float32 the thought matrix and vector keep float32 and hold to 1e-4."""
    w, a, r, _ = calib(4, 5, dtype=np.float32)
    dw = dw_of(impl, a, r, w)
    same_dtype(dw, np.float32, "dW*")
    close(a @ (w + dw).T, r, TOL32, "(W + dW*) a_t (float32)")
    d = delta_of(impl, r, a @ w.T)
    same_dtype(d, np.float32, "delta*")


@check(U, "control", public=[None])
def not_the_mean_of_token_patches(impl):
    """dW* is not the mean of the per-token M1 patches (that one misses every token), and y^C = y gives delta* = 0."""
    from ...lemmas import m1

    w, a, r, a_ctx = calib(5, 5)
    mean = np.mean([m1(w, a[t:t + 1], a_ctx[t:t + 1]).dense(0) for t in range(5)], axis=0)
    setup_far(a @ (w + mean).T, r, "the mean of token patches")
    far(dw_of(impl, a, r, w), mean, "dW* vs the mean of the per-token patches")
    y = rng(6).standard_normal((4, 3))
    if np.any(delta_of(impl, y, y.copy()) != 0):
        raise AssertionError("y^C = y, yet delta* is not 0")


@check(U, "min_norm", public=[None], hidden=[dict(seed=17)])
def rank_deficient_minimum_norm(impl, seed=7):
    """Collinear calibration tokens (rank(A) < T): the minimum-norm solution, E^T (A^+)^T, and a warning."""
    from ...thought import RankDeficientWarning

    g = rng(seed)
    w, a = g.standard_normal((4, 8)), g.standard_normal((3, 8))
    a = np.concatenate([a, 2.0 * a[:1]])
    r = g.standard_normal((4, 4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dw = as_array(impl.thought_matrix(a, r, w, 0.0), "thought_matrix", "dw")
    close(dw, (np.linalg.pinv(a) @ (r - a @ w.T)).T, 1e-10, "dW* vs the minimum-norm solution")
    if not any(issubclass(x.category, RankDeficientWarning) for x in seen):
        raise AssertionError("rank(A) = 3 < 4 tokens: warn RankDeficientWarning (the fit is not unique)")


@check(U, "errors", public=[dict(what="empty"), dict(what="nan")], hidden=[dict(what="ridge")])
def matrix_bad_calibration(impl, what):
    """No tokens, NaN in the inputs, a negative ridge: InputError (never NaN out)."""
    w, a, r, _ = calib(10, 4)
    ridge = 0.0
    if what == "empty":
        a, r = a[:0], r[:0]
    elif what == "nan":
        a = a.copy()
        a[1, 2] = np.nan
    else:
        ridge = -1.0
    raises(InputError, impl.thought_matrix, a, r, w, ridge, what=f"thought_matrix with {what} calibration")


@check(U, "errors", public=[dict(what="shape")], hidden=[dict(what="empty")])
def vector_bad_values(impl, what):
    """thought_vector: shapes that disagree (ShapeError) or no tokens (InputError)."""
    y = rng(11).standard_normal((5, 3))
    if what == "shape":
        raises(ShapeError, impl.thought_vector, y, y[:3], what="thought_vector on [5, 3] and [3, 3]")
    else:
        raises(InputError, impl.thought_vector, y[:0], y[:0], what="thought_vector on no tokens")


@check(U, "no_mutation", public=[None])
def no_mutation(impl):
    """thought_matrix and thought_vector leave their inputs untouched."""
    w, a, r, _ = calib(12, 5)
    copies = frozen(a, r, w)
    dw_of(impl, a, r, w)
    delta_of(impl, r, a @ w.T)
    unchanged((a, r, w), copies, ("a", "r", "w"))
    y, yc = a.copy(), a + 1.0
    cy = frozen(y, yc)
    delta_of(impl, yc, y)
    unchanged((yc, y), cy[::-1], ("y_ctx", "y"))
