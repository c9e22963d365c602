"""Condensation forms beside the least-squares thought matrix: the covariance-weighted ridge
(MATH.md T3, a MEMIT-style update) with its regulariser chosen by generalised cross-validation,
and the rank-r truncation (MATH.md T4).

T3, for one weight with calibration inputs A [T, in] and required output changes E [T, out]:

    dW = argmin ||A dW^T - E||_F^2 + lam tr(dW C0 dW^T) = E^T A (A^T A + lam C0)^{-1}
       = E^T (G + lam I)^{-1} A C0^{-1},        G = A C0^{-1} A^T  [T, T]

(push-through identity), so every lam costs one eigendecomposition of G, shared by all lam.
C0 is a key covariance (:class:`KeyCovariance`): the second moment of the weight's inputs over
the prompt, shrunk towards a multiple of the identity so that it is invertible.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backend import device, namespace
from .errors import InputError, ShapeError

KAPPAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""The ridge grid of T3, relative: lam = kappa * tr(G) / T."""

SHRINK = 0.1
"""C0 = K^T K / P + eps I with eps = SHRINK * tr(K^T K / P) / in."""


def _finite(x, what):
    xp = namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise InputError(f"{what} contains NaN or inf")


@dataclass(frozen=True)
class KeyCovariance:
    """C0 = K^T K / P + eps I (MATH.md T3), applied through the Woodbury identity.

    Attributes:
      keys: [P, in] the key rows K. eps: the identity floor (> 0).
    """

    keys: object
    eps: float

    @classmethod
    def from_keys(cls, keys, shrink=SHRINK):
        """C0 of key rows ``keys`` [P, in] (P >= 1), floored at ``shrink`` times their mean square."""
        xp = namespace(keys)
        if keys.ndim != 2 or keys.shape[0] == 0:
            raise ShapeError(f"keys must be [P, in] with P >= 1, got {tuple(keys.shape)}")
        if not shrink > 0:
            raise InputError(f"shrink must be > 0, got {shrink}")
        _finite(keys, "keys")
        eps = shrink * float(xp.sum(keys * keys)) / (keys.shape[0] * keys.shape[1])
        if not eps > 0:
            raise InputError("keys are all zero: C0 would be 0")
        return cls(keys, eps)

    def dense(self):
        """C0 [in, in] (for tests)."""
        xp, k = namespace(self.keys), self.keys
        return k.mT @ k / k.shape[0] + self.eps * xp.eye(k.shape[1], dtype=k.dtype, device=device(k))

    def solve(self, x):
        """C0^{-1} x for x [in, T]: (1/eps) (x - K^T (P eps I + K K^T)^{-1} K x)."""
        xp, k = namespace(self.keys, x), self.keys
        P = k.shape[0]
        small = k @ k.mT + P * self.eps * xp.eye(P, dtype=k.dtype, device=device(k))
        return (x - k.mT @ xp.linalg.solve(small, k @ x)) / self.eps


@dataclass(frozen=True)
class CovRidge:
    """A T3 fit: dW = left @ right (rank <= T).

    Attributes:
      left: [out, T]; right: [T, in]. lam: the chosen regulariser; kappa = lam T / tr(G).
      gcv: GCV score per kappa of :data:`KAPPAS` (or the grid given). residual: ||A dW^T - E||_F;
      rel_residual: over ||E||_F. n_tokens: T.
    """

    left: object
    right: object
    lam: float
    kappa: float
    gcv: tuple
    residual: float
    rel_residual: float
    n_tokens: int

    @property
    def dw(self):
        """The dense update [out, in]."""
        return self.left @ self.right


def cov_ridge_patch(a, e, cov, kappas=KAPPAS):
    """T3: the covariance-weighted ridge update, lam chosen by generalised cross-validation.

        dW = E^T (G + lam I)^{-1} A C0^{-1},   G = A C0^{-1} A^T = Q diag(s) Q^T
        GCV(lam) = T ||(I - H) E||_F^2 / (T - tr H)^2,   H = G (G + lam I)^{-1}

    (Golub, Heath & Wahba 1979): the leave-one-out error of the fit, rotation-invariant; it
    uses the calibration tokens only.

    Args:
      a: [T, in] calibration inputs. e: [T, out] required changes. cov: :class:`KeyCovariance`
        over ``in``. kappas: relative grid, lam = kappa * tr(G) / T.
    Returns:
      :class:`CovRidge`.
    """
    xp = namespace(a, e)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0] or cov.keys.shape[-1] != a.shape[1]:
        raise ShapeError(f"cov_ridge_patch: a {tuple(a.shape)} [T, in], e {tuple(e.shape)} [T, out] and "
                         f"keys {tuple(cov.keys.shape)} [P, in] disagree")
    T = a.shape[0]
    if T == 0:
        raise InputError("cov_ridge_patch: the calibration set is empty")
    if not kappas or min(kappas) <= 0:
        raise InputError(f"kappas must be positive, got {kappas}")
    _finite(a, "calibration inputs"), _finite(e, "calibration targets")
    b = cov.solve(a.mT)                                                       # [in, T] = C0^{-1} A^T
    g = a @ b
    s, q = xp.linalg.eigh((g + g.mT) / 2)
    s = xp.where(s > 0, s, xp.zeros_like(s))
    scale = float(xp.sum(s)) / T
    if not scale > 0:
        raise InputError("cov_ridge_patch: the calibration inputs are all zero")
    qe = q.mT @ e                                                             # [T, out]
    rows = xp.sum(qe * qe, axis=1)                                            # ||(Q^T E)_i||^2
    scores = []
    for kappa in kappas:
        lam = kappa * scale
        f = lam / (s + lam)
        tr_h = float(xp.sum(s / (s + lam)))
        scores.append(T * float(xp.sum(f * f * rows)) / max(T - tr_h, 1e-300) ** 2)
    best = min(range(len(kappas)), key=lambda i: scores[i])
    lam = kappas[best] * scale
    coef = q @ (qe / (s + lam)[:, None])                                      # (G + lam I)^{-1} E  [T, out]
    left, right = coef.mT, b.mT                                               # dW = E^T (G+lam)^{-1} (C0^{-1} A^T)^T
    res = float(xp.sqrt(xp.sum((g @ coef - e) ** 2)))
    tot = float(xp.sqrt(xp.sum(e * e)))
    return CovRidge(left, right, lam, kappas[best], tuple(scores), res, res / tot if tot > 0 else 0.0, T)


def truncate(left, right, ranks, right_qr=None):
    """T4: the best rank-r approximations (Frobenius, Eckart-Young) of dW = left @ right.

        left = Q_l R_l, right^T = Q_r R_r (thin QR);  R_l R_r^T = U S V^T;
        dW_r = Q_l U[:, :r] S[:r] V[:, :r]^T Q_r^T

    Args:
      left: [out, k]; right: [k, in]. ranks: iterable of r >= 1.
      right_qr: optional (Q_r, R_r) of right^T, when several lefts share one right.
    Returns:
      dict r -> dense [out, in] (dW itself where r >= rank).
    """
    xp = namespace(left, right)
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ShapeError(f"truncate: left {tuple(left.shape)} and right {tuple(right.shape)} do not multiply")
    ql, rl = xp.linalg.qr(left)
    qr_, rr = xp.linalg.qr(right.mT) if right_qr is None else right_qr
    u, s, vt = xp.linalg.svd(rl @ rr.mT, full_matrices=False)
    out = {}
    for r in ranks:
        if int(r) < 1:
            raise InputError(f"rank must be >= 1, got {r}")
        k = min(int(r), s.shape[0])
        out[int(r)] = (ql @ (u[:, :k] * s[:k])) @ (qr_ @ vt[:k, :].mT).mT
    return out


__all__ = ["KAPPAS", "SHRINK", "KeyCovariance", "CovRidge", "cov_ridge_patch", "truncate"]
