"""The three exact constructions for an RMSNorm after the down-projection (MATH.md M6).

Gemma's MLP sublayer ends ``out = y + rms_s(h W_down^T)`` with multiplier ``s = 1 + g_pf``
(OLMo 2: ``s = g``). After M1 has patched the inner part so the hidden is ``h^C``, the
outer part must add ``delta = y^C - y``: the post-norm must output ``t = s * u^C + delta``
where ``u^C = rms_unit(m^C)`` and ``m^C = h^C W_down^T``. Each function takes plain arrays
``(s, eps, h_ctx, m_ctx, delta)`` and returns an :class:`M6Patch`: the Rank1 patch of
W_down (None for M6a) and the Scale patch of the post-norm multiplier.

  m6a  the paper's construction (Goldwaser et al. 2025): elementwise scale only,
       dg = delta / u^C; needs every coordinate of u^C nonzero (above machine epsilon).
  m6b  M2 on W_down so it outputs v_t = t / s, then one scalar per token,
       s -> s * sqrt(mean(v_t^2) + eps); needs h^C != 0 and every s_i != 0.
  m6c  MATH.md's "stable variant": W_down outputs rho * y*, y* the trust-region minimiser
       of ||s * y - t|| with mean(y^2) = 1, and an elementwise scale absorbs the rest.
  m6d  (ours, not in MATH.md) M6b's direction made total: W_down outputs rho * y with
       y = t / s_hat normalised, s_hat = s with entries floored away from zero, and an
       elementwise scale absorbs the rest. The scale patch is s (R - 1) where |s| is above
       the floor: uniform, like M6b's scalar, so rounding is not amplified.

Measured on the real Gemma 3 270M (the generation experiment, 5 prompts x 20 tokens, every
earlier token context; README): with M7 built in closed loop (the default) m6a, m6c and m6d
all stay at rounding level in float64 (<= 1e-11) and keep every token; m6b has no witness
(its post-FFW norms have 1 + g = 0 entries). In float32 and bfloat16, m6a's scale patch
(up to 6e7) makes its tokens depend on the last bits of the arithmetic. In open loop the
scale patch multiplies the drift of earlier layers: m6a (scale patch up to 3e8) loses the
first token, m6c (2e5) reaches 1.5e-8 in float64, m6d (1e3) stays at 2e-12. M6c minimises the residual the
elementwise scale absorbs, not its ratio to the normalised output, which is what rounding
amplifies; M6d bounds that ratio.
"""
from __future__ import annotations

from typing import NamedTuple

from .backend import namespace
from .errors import MethodError, NotControllableError
from .lemmas import first_bad, m2
from .ops import rms_unit
from .patches import Scale

METHODS = ("m6a", "m6b", "m6c", "m6d")
AUTO_ORDER = ("m6d", "m6c", "m6b", "m6a")   # what method="auto" tries, in order (see construct)


class M6Patch(NamedTuple):
    """The outer part of a Gemma layer patch: ``down`` Rank1 on W_down (None: untouched),
    ``scale`` the Scale patch of the post-norm multiplier s."""

    down: object
    scale: Scale


def m6a(s, eps, h_ctx, m_ctx, delta):
    """M6a: dg_pf = delta / u^C elementwise, so y + (s + dg) u^C = y^C + s u^C.

    Args:
      s: [D] the post-norm multiplier; eps: its epsilon.
      h_ctx: [T, F] hidden with context (unused: W_down is untouched).
      m_ctx: [T, D] down-projection output with context.
      delta: [T, D] = y^C - y.
    Returns:
      M6Patch(None, Scale(add=dg)).
    """
    xp = namespace(m_ctx)
    u = rms_unit(m_ctx, eps)
    # u is unit-RMS: a coordinate at or below machine epsilon is zero to rounding, and
    # dividing by it would give a scale patch of 1/eps or more (no witness in finite precision)
    zero = xp.abs(u) <= xp.finfo(u.dtype).eps
    if bool(xp.any(zero)):
        first_bad(zero, u, "u^C coordinate", hint="M6a divides by every coordinate; use m6b or m6c")
    return M6Patch(None, Scale(add=delta / u))


def m6b(s, eps, h_ctx, m_ctx, delta):
    """M6b: M2 on W_down so it outputs v_t = t / s, then s -> s * sqrt(mean(v_t^2) + eps)."""
    xp = namespace(m_ctx)
    zero = s == 0
    if bool(xp.any(zero)):
        first_bad(xp.broadcast_to(zero, m_ctx.shape), xp.broadcast_to(s, m_ctx.shape),
                  "post-norm multiplier entry", hint="M6b divides by s = 1 + g; use m6a")
    t = s * rms_unit(m_ctx, eps) + delta
    v_t = t / s
    mul = xp.sqrt(xp.mean(v_t * v_t, axis=-1, keepdims=True) + eps)
    return M6Patch(m2(h_ctx, v_t - m_ctx, quantity="||h^C||^2"), Scale(mul=mul))


def m6c(s, eps, h_ctx, m_ctx, delta):
    """M6c: W_down outputs rho * y*, then an elementwise scale absorbs t - s * rms_unit(rho y*).

    y* = argmin ||s * y - t||^2 subject to mean(y^2) = 1 (see :func:`trust_region`),
    rho = rms(m^C). Coordinates where rms_unit(rho y*) is zero carry zero residual, so their
    scale patch is 0; a nonzero residual there has no witness (NotControllableError).

    Where a multiplier entry s_i is exactly 0 (real Gemma 3 270M has such entries in its
    post-FFW norms), MATH.md's objective ignores y_i and its minimiser puts y_i = 0, so no
    elementwise scale could reach t_i != 0. We solve the trust region with those s_i
    replaced by 1 (y_i then follows t_i); the elementwise scale still absorbs the exact
    residual, so the construction stays exact.
    """
    xp = namespace(m_ctx)
    t = s * rms_unit(m_ctx, eps) + delta
    s_solve = xp.where(s == 0, xp.ones_like(s), s)
    y = trust_region(s_solve, t)
    rho = xp.sqrt(xp.mean(m_ctx * m_ctx, axis=-1, keepdims=True))
    return _down_then_scale(s, eps, t, h_ctx, m_ctx, rho * y)


def m6d(s, eps, h_ctx, m_ctx, delta, floor=0.1):
    """M6d (ours): W_down outputs rho * y, y = (t / s_hat) / rms(t / s_hat); then the scale
    s -> s + dg with dg = (t - s * r) / r, r = rms_unit(rho * y), absorbs the remainder.

    s_hat_i = sign(s_i) * max(|s_i|, floor * rms(s)) (sign + for s_i = 0). Where |s_i| is
    above the floor, dg_i = s_i (R - 1) with one R per token (M6b's scalar, elementwise);
    elsewhere |dg_i| <= floor * rms(s) * R. r_i = 0 only where t_i = 0, where dg_i = 0 is
    exact. Needs h^C != 0 (M2) and nothing else.
    """
    xp = namespace(m_ctx)
    t = s * rms_unit(m_ctx, eps) + delta
    rs = xp.sqrt(xp.mean(s * s))
    mag = xp.maximum(xp.abs(s), floor * rs)
    mag = xp.where(mag == 0, xp.ones_like(mag), mag)          # every s_i = 0: any direction works
    y = t / xp.where(s < 0, -mag, mag)
    ry = xp.sqrt(xp.mean(y * y, axis=-1, keepdims=True))
    rho = xp.sqrt(xp.mean(m_ctx * m_ctx, axis=-1, keepdims=True))
    h_star = rho * y / xp.where(ry == 0, xp.ones_like(ry), ry)
    return _down_then_scale(s, eps, t, h_ctx, m_ctx, h_star)


def _down_then_scale(s, eps, t, h_ctx, m_ctx, h_star):
    """The common tail of M6c and M6d: M2 on W_down so it outputs ``h_star``, then the
    elementwise scale patch dg = (t - s r) / r, r = rms_unit(h_star), absorbs the remainder.

    Coordinates where r is zero need a zero remainder (their dg is 0); a nonzero one there
    has no witness (NotControllableError). M6d never meets that case: r_i = 0 only if t_i = 0.
    """
    xp = namespace(m_ctx)
    r = rms_unit(h_star, eps)
    resid = t - s * r
    zero = r == 0
    stuck = zero & (resid != 0)
    if bool(xp.any(stuck)):
        first_bad(stuck, resid, "residual on a zero coordinate of rms_unit(h*)", hint="use m6a")
    dg = xp.where(zero, xp.zeros_like(r), resid / xp.where(zero, xp.ones_like(r), r))
    return M6Patch(m2(h_ctx, h_star - m_ctx, quantity="||h^C||^2"), Scale(add=dg))


def trust_region(s, t, iters=60):
    """Rows of y* = argmin ||s * y - t||^2 subject to mean(y^2) = 1 (MATH.md M6c).

    y = s t / (s^2 - mu) with mu < min(s^2) the root of mean(t^2 s^2 / (s^2 - mu)^2) = 1,
    found by Newton's method on phi(mu)^(-1/2) - 1 (monotone from the left, as for the
    trust-region secular equation), safeguarded to [lo, min s^2). The *hard case*: when t s
    vanishes on the coordinates of smallest s^2 and the others alone have mean <= 1, no root
    exists; then mu = min(s^2) and those free coordinates are filled equally to meet the
    constraint. Solved in float64.

    Args:
      s: [D]; t: [T, D].
    Returns:
      [T, D] in t's dtype, each row with mean(y^2) = 1 (to rounding).
    """
    xp = namespace(t)
    dt = t.dtype
    s64, t64 = xp.astype(s, xp.float64), xp.astype(t, xp.float64)
    D = t.shape[-1]
    s2 = s64 * s64
    m = xp.min(s2)
    c = (t64 * s64) ** 2                                     # [T, D]
    is_min = s2 == m                                         # [D]
    c_min = xp.sum(xp.where(is_min, c, xp.zeros_like(c)), axis=-1)       # [T]
    gap = xp.where(is_min, xp.ones_like(s2), s2 - m)
    phi_m = xp.sum(xp.where(is_min, xp.zeros_like(c), c / gap**2), axis=-1) / D
    hard = (c_min == 0) & (phi_m <= 1)                        # [T]

    lo = m - xp.sqrt(xp.mean(c, axis=-1)) - xp.abs(m) * 1e-12 - 1e-300   # phi(lo) <= 1
    mu = lo
    for _ in range(iters):
        d = s2[None, :] - mu[:, None]
        phi = xp.mean(c / d**2, axis=-1)
        dphi = xp.mean(2.0 * c / d**3, axis=-1)
        f = phi ** -0.5 - 1.0
        fp = -0.5 * phi ** -1.5 * dphi
        step = xp.where(hard | (phi == 0), xp.zeros_like(mu), f / fp)
        new = xp.clip(mu - step, lo, None)
        new = xp.where(new >= m, (mu + m) / 2, new)
        moving = (new != mu) & (xp.abs(f) > 16 * xp.finfo(xp.float64).eps)
        mu = new
        if not bool(xp.any(moving)):
            break
    d = s2[None, :] - mu[:, None]
    y = s64 * t64 / xp.where(d == 0, xp.ones_like(d), d)

    # hard case: mu = min s^2, free coordinates filled equally
    y_h = xp.where(is_min, xp.zeros_like(c), s64 * t64 / gap)
    rest = D - xp.sum(y_h * y_h, axis=-1, keepdims=True)
    n_min = xp.sum(xp.astype(is_min, xp.float64))
    fill = xp.sqrt(xp.clip(rest, 0, None) / n_min)
    y_h = xp.where(is_min, xp.broadcast_to(fill, c.shape), y_h)
    y = xp.where(hard[:, None], y_h, y)
    return xp.astype(y, dt)


CONSTRUCTIONS = {"m6a": m6a, "m6b": m6b, "m6c": m6c, "m6d": m6d}


def construct(method, s, eps, h_ctx, m_ctx, delta):
    """Run one construction by name; ``'auto'`` tries :data:`AUTO_ORDER` (m6d, m6c, m6b, m6a)
    and returns the first that has a witness.

    The order is by conditioning (MATH.md M6d): M6d and M6b scale every coordinate by the
    same factor where |s_i| is not tiny; M6c's residual scale grows like |mu| / s_i where
    s_i is tiny; M6a divides by every coordinate of u^C. M6a is the only one that needs no
    h^C != 0.

    Returns:
      (name actually used, :class:`M6Patch`).
    Raises:
      MethodError: an unknown name. NotControllableError: no construction has a witness.
    """
    if method != "auto":
        try:
            fn = CONSTRUCTIONS[method]
        except KeyError:
            raise MethodError(method, "post-norm (M6)", ("auto",) + METHODS) from None
        return method, fn(s, eps, h_ctx, m_ctx, delta)
    err = None
    for name in AUTO_ORDER:
        try:
            return name, CONSTRUCTIONS[name](s, eps, h_ctx, m_ctx, delta)
        except NotControllableError as e:
            err = e
    raise err
