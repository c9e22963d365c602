"""MATH.md T3 and T4: the covariance-weighted ridge (MEMIT-style) and the rank-r truncation,
checked against their direct formulas."""
from __future__ import annotations

import numpy as np
import pytest

from minipatch.errors import InputError, ShapeError
from minipatch.thought import thought_matrix
from minipatch.thought_forms import KAPPAS, KeyCovariance, cov_ridge_patch, truncate

from helpers import CONTROL_MIN, TOL64_BLOCK, rel_err

pytestmark = pytest.mark.thought
rng = np.random.default_rng


def _case(T=9, n_in=12, out=5, P=4):
    return rng(0).standard_normal((T, n_in)), rng(1).standard_normal((T, out)), rng(2).standard_normal((P, n_in))


def test_key_covariance_woodbury():
    _, _, k = _case()
    cov = KeyCovariance.from_keys(k, shrink=0.1)
    c0 = k.T @ k / 4 + 0.1 * np.mean(k * k) * np.eye(12)
    assert rel_err(cov.dense(), c0) < TOL64_BLOCK
    x = rng(3).standard_normal((12, 3))
    assert rel_err(cov.solve(x), np.linalg.solve(c0, x)) < 1e-12
    assert rel_err(cov.solve(x), x / cov.eps) > CONTROL_MIN            # the keys matter
    with pytest.raises(InputError):
        KeyCovariance.from_keys(np.zeros((3, 4)))
    with pytest.raises(ShapeError):
        KeyCovariance.from_keys(k[:0])
    with pytest.raises(InputError):
        KeyCovariance.from_keys(k, shrink=0.0)


def test_cov_ridge_is_memits_closed_form():
    """T3: dW = E^T A (A^T A + lam C0)^{-1} at the chosen lam; GCV by the hat matrix."""
    a, e, k = _case()
    cov = KeyCovariance.from_keys(k)
    c0 = cov.dense()
    fit = cov_ridge_patch(a, e, cov)
    assert rel_err(fit.dw, np.linalg.solve(a.T @ a + fit.lam * c0, a.T @ e).T) < 1e-10
    g = a @ np.linalg.solve(c0, a.T)
    for kappa, score in zip(KAPPAS, fit.gcv):
        lam = kappa * np.trace(g) / 9
        h = g @ np.linalg.inv(g + lam * np.eye(9))
        want = 9 * np.sum(((np.eye(9) - h) @ e) ** 2) / (9 - np.trace(h)) ** 2
        assert abs(score - want) < 1e-9 * want
    assert fit.gcv[KAPPAS.index(fit.kappa)] == min(fit.gcv)
    assert rel_err(fit.residual, np.linalg.norm(a @ fit.dw.T - e)) < 1e-10
    # negative control: ordinary ridge (C0 = I) is another update
    plain = np.linalg.solve(a.T @ a + fit.lam * np.eye(12), a.T @ e).T
    assert rel_err(fit.dw, plain) > CONTROL_MIN


def test_rome_is_the_rank_one_case():
    """One key, lam -> 0: dW = e (C0^{-1} k)^T / (k^T C0^{-1} k) (ROME), and dW k = e exactly."""
    a, e, k = _case(T=1)
    cov = KeyCovariance.from_keys(k)
    fit = cov_ridge_patch(a, e, cov, kappas=(1e-12,))
    ck = np.linalg.solve(cov.dense(), a[0])
    assert rel_err(fit.dw, np.outer(e[0], ck) / (a[0] @ ck)) < 1e-9
    assert rel_err(fit.dw @ a[0], e[0]) < 1e-9
    m1 = thought_matrix(a, a @ np.zeros((12, 5)) + e, np.zeros((5, 12))).dw   # C0 = I: M1's direction
    assert rel_err(fit.dw, m1) > CONTROL_MIN


def test_cov_ridge_bad_input():
    a, e, k = _case()
    cov = KeyCovariance.from_keys(k)
    with pytest.raises(ShapeError):
        cov_ridge_patch(a, e[:3], cov)
    with pytest.raises(ShapeError):
        cov_ridge_patch(a[:, :5], e, cov)
    with pytest.raises(InputError):
        cov_ridge_patch(a[:0], e[:0], cov)
    with pytest.raises(InputError):
        cov_ridge_patch(a, e, cov, kappas=(0.0,))
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError):
        cov_ridge_patch(bad, e, cov)


def test_truncate_is_the_svd_truncation():
    """T4: best rank-r (Eckart-Young) of dW = L R from its factors."""
    left, right = rng(4).standard_normal((7, 4)), rng(5).standard_normal((4, 6))
    dw = left @ right
    u, s, vt = np.linalg.svd(dw)
    out = truncate(left, right, [1, 2, 10])
    for r, got in out.items():
        k = min(r, 4)
        assert rel_err(got, (u[:, :k] * s[:k]) @ vt[:k]) < TOL64_BLOCK
        assert np.linalg.matrix_rank(got) == k
    assert rel_err(out[10], dw) < TOL64_BLOCK
    assert rel_err(out[1], dw) > CONTROL_MIN
    with pytest.raises(InputError):
        truncate(left, right, [0])
    with pytest.raises(ShapeError):
        truncate(left, right[:3], [1])
