"""The two absorption lemmas everything else is built from (MATH.md M1, M2).

Both are vectorized over tokens: row t of every array belongs to kept token t.
"""
from __future__ import annotations

from .backend import namespace
from .errors import NotControllableError, ShapeError
from .patches import Rank1


def safe_sqnorm(a, quantity):
    """||a_t||^2 over the last axis, [T, ..., 1]; raises NotControllableError where it is zero.

    A witness that divides by ||a||^2 does not exist when a = 0 (MATH.md section 7); a
    squared norm that underflows to below the dtype's smallest normal number counts as zero.
    """
    xp = namespace(a)
    sq = xp.sum(a * a, axis=-1, keepdims=True)
    tiny = xp.finfo(a.dtype).smallest_normal
    bad = ~(sq > tiny)  # also catches NaN
    if bool(xp.any(bad)):
        first_bad(bad, sq, quantity)
    return sq


def first_bad(bad, value, quantity, hint=""):
    """Raise NotControllableError for the first token row where ``bad`` holds."""
    import numpy as np

    from .backend import to_numpy

    b = to_numpy(bad).reshape(bad.shape[0], -1)
    row = int(np.argmax(b.any(axis=1)))
    vals = to_numpy(value).reshape(value.shape[0], -1)[row]
    col = int(np.argmax(b[row])) if b.shape[1] > 1 else 0
    v = float(vals[min(col, vals.size - 1)])
    raise NotControllableError(quantity, v, position=row, hint=hint)


def m1(w, a, a_ctx, *, quantity="||a||^2", v=None):
    """Rank-1 input absorption (MATH.md M1; Dherin et al. 2025).

        dW = (W (a' - a)) a^T / ||a||^2,   so (W + dW) a = W a'

    The minimum-Frobenius-norm solution of dW a = W (a' - a).

    Args:
      w: [out, in] weight that reads the input, or [E, out, in] stacked experts.
      a: [T, in] inputs without context (rows must be nonzero).
      a_ctx: [T, in] inputs with context.
      v: optional precomputed a / ||a||^2 (shared by several weights reading ``a``).
    Returns:
      Rank1 with u [T, out] (or [T, E, out]) and v [T, in].
    """
    xp = namespace(w, a, a_ctx)
    if a.shape != a_ctx.shape or a.ndim != 2 or a.shape[-1] != w.shape[-1]:
        raise ShapeError(f"m1: a {a.shape}, a_ctx {a_ctx.shape} must both be [T, {w.shape[-1]}]")
    if v is None:
        v = a / safe_sqnorm(a, quantity)
    u = (a_ctx - a) @ w.mT                       # [T, out] or [E, T, out]
    if u.ndim == 3:
        u = xp.permute_dims(u, (1, 0, 2))        # [T, E, out]
    return Rank1(u, v)


def m2(h, delta, *, quantity="||h||^2"):
    """Rank-1 output absorption (MATH.md M2).

        dW = delta h^T / ||h||^2,   so (W + dW) h = W h + delta

    The minimum-Frobenius-norm solution of dW h = delta. It does not depend on W.

    Args:
      h: [T, in] (or [T, E, in]) inputs of the weight, rows nonzero.
      delta: [T, out] (or [T, E, out]) the required change of the output.
    Returns:
      Rank1 with u = delta and v = h / ||h||^2.
    """
    if h.shape[:-1] != delta.shape[:-1]:
        raise ShapeError(f"m2: h {h.shape} and delta {delta.shape} disagree on leading axes")
    return Rank1(delta, h / safe_sqnorm(h, quantity))


def pinv_form(w, a, a_ctx):
    """M1's patch for one token as ``residual @ pinv(a)`` (numpy only; for tests and notebooks).

    Shows that M1 is the minimum-norm solution: dW = (W a' - W a) a^+ with a^+ = a^T/||a||^2.
    """
    import numpy as np

    r = (w @ (a_ctx - a))[:, None]
    return r @ np.linalg.pinv(a[:, None])
