"""Wrong implementations of the plain-array units: m1m2, m3m4, m5, thought."""
from __future__ import annotations

import numpy as np

from .. import reference as R
from . import mutant


def _sq(a):
    return np.sum(a * a, axis=-1, keepdims=True)


def _joint_dense(a, e):
    """The one least-squares dW for all tokens, repeated per token (a thought matrix)."""
    dw = (np.linalg.pinv(a) @ e).T
    return np.broadcast_to(dw, (a.shape[0],) + dw.shape).copy()


def _upcast(fn):
    def wrong(*args):
        return fn(*[x.astype(np.float64) if hasattr(x, "astype") else x for x in args])
    return wrong


# ---- m1m2 -----------------------------------------------------------------------------------

def _m1_norm(w, a, a_ctx):
    u, _ = R.m1(w, a, a_ctx)
    return u, a / np.linalg.norm(a, axis=-1, keepdims=True)


def _m1_v_ctx(w, a, a_ctx):
    u, _ = R.m1(w, a, a_ctx)
    return u, a_ctx / np.sum(a * a_ctx, axis=-1, keepdims=True)


def _m1_eps(w, a, a_ctx):
    return (a_ctx - a) @ w.T, a / (_sq(a) + 1e-8)


def _m1_in_place(w, a, a_ctx):
    d = a_ctx
    d -= a
    return d @ w.T, a / _sq(a)


def _m2_in_place(h, delta):
    h /= _sq(h)
    return delta, h


mutant("m1m2", "M1 normalised by ||a|| instead of ||a||^2", "exact64", m1=_m1_norm)
mutant("m1m2", "M1 with v = a' / (a . a') (exact, not minimum norm)", "min_norm", m1=_m1_v_ctx)
mutant("m1m2", "M1 as one least-squares dW for all tokens", "rank",
       m1=lambda w, a, a_ctx: _joint_dense(a, (a_ctx - a) @ w.T))
mutant("m1m2", "M1 with u = W a' (forgets - W a)", "exact64", m1=lambda w, a, a_ctx: (a_ctx @ w.T, a / _sq(a)))
mutant("m1m2", "M1 hides a zero input with / (||a||^2 + 1e-8)", "errors", m1=_m1_eps)
mutant("m1m2", "M1 computes a' - a in place", "no_mutation", m1=_m1_in_place)
mutant("m1m2", "everything in float64", "exact32", m1=_upcast(R.m1), m2=_upcast(R.m2))
mutant("m1m2", "M2 normalised by ||h|| instead of ||h||^2", "exact64",
       m2=lambda h, delta: (delta, h / np.linalg.norm(h, axis=-1, keepdims=True)))
mutant("m1m2", "M2 without the zero check (NaN for a dead hidden)", "errors",
       m2=lambda h, delta: (delta, h / _sq(h)))
mutant("m1m2", "M2 as one least-squares dW for all tokens", "rank", m2=lambda h, delta: _joint_dense(h, delta))
mutant("m1m2", "M2 normalises h in place", "no_mutation", m2=_m2_in_place)

# ---- m3m4 -----------------------------------------------------------------------------------


def _m4_in_place(w1, z, z_ctx):
    u, v = R.m1(w1, z, z_ctx)
    d = z_ctx
    d -= z
    return u, v, d


mutant("m3m4", "M3 with v = a / ||a'||^2 (the with-context norm)", "exact64",
       m3=lambda w, a, a_ctx: ((a_ctx - a) @ w.T, a / _sq(a_ctx)))
mutant("m3m4", "M3 with u = W a' (forgets - W a)", "control", m3=lambda w, a, a_ctx: (a_ctx @ w.T, a / _sq(a)))
mutant("m3m4", "M3 as one least-squares dW for all tokens", "rank",
       m3=lambda w, a, a_ctx: _joint_dense(a, (a_ctx - a) @ w.T))
mutant("m3m4", "M3 with v = a' / (a . a') (exact, not minimum norm)", "min_norm", m3=_m1_v_ctx)
mutant("m3m4", "M3 hides a zero attention output with + 1e-8", "errors", m3=_m1_eps)
mutant("m3m4", "M4 without the output bias shift", "exact64",
       m4=lambda w1, z, z_ctx: R.m1(w1, z, z_ctx) + (np.zeros_like(z),))
mutant("m3m4", "M4 shifts b2 by z - z^C", "exact64", m4=lambda w1, z, z_ctx: R.m1(w1, z, z_ctx) + (z - z_ctx,))
mutant("m3m4", "M4 computes z^C - z in place", "no_mutation", m4=_m4_in_place)
mutant("m3m4", "M3 computes a' - a in place", "no_mutation", m3=_m1_in_place)
mutant("m3m4", "M4 as one least-squares dW1 for all tokens", "rank",
       m4=lambda w1, z, z_ctx: (_joint_dense(z, (z_ctx - z) @ w1.T), z_ctx - z))
mutant("m3m4", "M4 hides a zero MLP input with + 1e-8", "errors",
       m4=lambda w1, z, z_ctx: _m1_eps(w1, z, z_ctx) + (z_ctx - z,))
mutant("m3m4", "everything in float64", "exact32", m3=_upcast(R.m3), m4=_upcast(R.m4))

# ---- m5 -------------------------------------------------------------------------------------


def _steps_last(w, a):
    u, _, _ = R.implicit_steps(w, a)
    return u, a[-1] / (a[-1] @ a[-1]), 1.0 / (a[-1] @ a[-1])


def _step_own_inputs(w, a, i):
    def patch(j):
        return np.outer(w @ (a[j] - a[0]), a[j]) / (a[j] @ a[j]) if j else np.zeros_like(w)
    return patch(i) - patch(i - 1)


def _steps_no_check(w, a):
    lr = 1.0 / (a[0] @ a[0])
    return (a - a[:1]) @ w.T, a[0] * lr, lr


def _step_no_check(w, a, i):
    return np.outer(w @ (a[i] - a[i - 1]), a[0]) / (a[0] @ a[0])


def _steps_in_place(w, a):
    u, v, lr = R.implicit_steps(w, a)
    a -= a[:1]
    return u, v, lr


mutant("m5", "normalised by the last input A_n instead of A_0", "exact64",
       implicit_steps=_steps_last)
mutant("m5", "gd_step returns the cumulative patch dW_i", "control",
       gd_step=lambda w, a, i: np.outer(w @ (a[i] - a[0]), a[0]) / (a[0] @ a[0]))
mutant("m5", "gd_step is a gradient ascent step (+h grad)", "exact64", gd_step=lambda w, a, i: -R.gd_step(w, a, i))
mutant("m5", "gd_step from prefix patches each normalised by their own input", "rank", gd_step=_step_own_inputs)
mutant("m5", "v = A_0 / ||A_0||^2 plus a direction orthogonal to A_0 (exact, not minimum norm)", "min_norm", implicit_steps=lambda w, a: _steps_plus_null(w, a))
mutant("m5", "no zero check on A_0", "errors", implicit_steps=_steps_no_check, gd_step=_step_no_check)
mutant("m5", "no range check on i (i = 0 reads A_-1)", "errors", gd_step=_step_no_check)
mutant("m5", "implicit_steps centres a in place", "no_mutation", implicit_steps=_steps_in_place)
mutant("m5", "everything in float64", "exact32", implicit_steps=_upcast(R.implicit_steps),
       gd_step=lambda w, a, i: R.gd_step(w.astype(np.float64), a.astype(np.float64), i))


def _steps_plus_null(w, a):
    """v = A_0/||A_0||^2 + a direction orthogonal to A_0: dW_i A_0 is right, ||dW_i|| is not minimal."""
    u, v, lr = R.implicit_steps(w, a)
    e = np.zeros_like(v)
    e[0] = 1.0
    e -= (e @ a[0]) / (a[0] @ a[0]) * a[0]
    return u, v + 0.1 * e, lr

# ---- thought --------------------------------------------------------------------------------


def _tm_mean_patches(a, r, w, ridge=0.0):
    e = r - a @ w.T
    return np.mean(e[:, :, None] * (a / _sq(a))[:, None, :], axis=0)


def _tm_stable(a, r, w, ridge=0.0):
    e = r - a @ w.T
    return np.linalg.solve(a.T @ a + (ridge + 1e-8) * np.eye(a.shape[1]), a.T @ e).T


def _tm_normal(a, r, w, ridge=0.0):
    e = r - a @ w.T
    return np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ e).T


def _tm_quiet(a, r, w, ridge=0.0):
    return (np.linalg.pinv(a) @ (r - a @ w.T)).T if ridge == 0 else _tm_normal(a, r, w, ridge)


def _tv_in_place(y_ctx, y):
    y_ctx -= y
    return y_ctx.mean(0)


mutant("thought", "dW* = the mean of the per-token M1 patches", "control", thought_matrix=_tm_mean_patches)
mutant("thought", "a ridge of 1e-8 always added 'for stability'", "exact64", thought_matrix=_tm_stable)
mutant("thought", "normal equations (A^T A)^-1 A^T E without pinv", "min_norm", thought_matrix=_tm_normal)
mutant("thought", "fits R instead of R - A W^T", "exact64",
       thought_matrix=lambda a, r, w, ridge=0.0: (np.linalg.pinv(a) @ r).T)
mutant("thought", "rank-deficient fit without RankDeficientWarning", "min_norm", thought_matrix=_tm_quiet)
mutant("thought", "no validation of the calibration set", "errors", thought_matrix=_tm_quiet,
       thought_vector=lambda y_ctx, y: np.mean(y_ctx - y, axis=0))
mutant("thought", "thought vector = mean of y^C (forgets - y)", "control", thought_vector=lambda y_ctx, y: y_ctx.mean(0))
mutant("thought", "thought vector subtracts in place", "no_mutation", thought_vector=_tv_in_place)
mutant("thought", "everything in float64", "exact32", thought_vector=_upcast(R.thought_vector),
       thought_matrix=lambda a, r, w, ridge=0.0: R.thought_matrix(a.astype(np.float64), r.astype(np.float64),
                                                                   w.astype(np.float64), ridge))
