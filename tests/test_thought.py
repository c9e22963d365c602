"""MATH.md section 6: least-squares thought vectors and thought matrices, model condensation."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from minipatch import lemmas
from minipatch.backend import to_numpy
from minipatch.errors import InputError, ShapeError
from minipatch.models import tiny, tiny_gemma
from minipatch.thought import (RankDeficientWarning, condense, condensed_model, lstsq_patch, thought_matrix,
                               thought_vector)
from minipatch.thought_eval import condensation_curve, evaluate

from helpers import CONTROL_MIN, TOL64_BLOCK, TOL64_MODEL, rel_err

pytestmark = pytest.mark.thought
rng = np.random.default_rng


def test_thought_vector():
    y = rng(0).standard_normal((9, 5))
    yc = y + rng(1).standard_normal((9, 5))
    tv = thought_vector(yc, y)
    assert rel_err(tv.delta, (yc - y).mean(0)) < TOL64_BLOCK
    assert tv.rel_residual > CONTROL_MIN and tv.n_tokens == 9
    same = thought_vector(y + 2.0, y)                                     # a constant shift is exact
    assert same.residual < 1e-12 and rel_err(same.delta, np.full(5, 2.0)) < TOL64_BLOCK
    with pytest.raises(InputError):
        thought_vector(y[:0], y[:0])
    with pytest.raises(ShapeError):
        thought_vector(yc, y[:3])
    bad = yc.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError):
        thought_vector(bad, y)


@pytest.mark.parametrize("T", [1, 5, 12])
def test_thought_matrix_exact_for_independent_inputs(T):
    """T <= in independent tokens: dW* reproduces every token's required output exactly."""
    w = rng(2).standard_normal((7, 12))
    a = rng(3).standard_normal((T, 12))
    a_ctx = a + rng(4).standard_normal((T, 12))
    fit = thought_matrix(a, a_ctx @ w.T, w)
    assert fit.exact and fit.rank == T
    assert rel_err(a @ (w + fit.dw).T, a_ctx @ w.T) < TOL64_BLOCK
    if T == 1:   # one token: the thought matrix is M1's rank-1 patch
        assert rel_err(fit.dw, lemmas.m1(w, a, a_ctx).dense(0)) < TOL64_BLOCK
    else:        # negative control: the mean of the per-token M1 patches is not a solution
        mean = np.mean([lemmas.m1(w, a[t:t + 1], a_ctx[t:t + 1]).dense(0) for t in range(T)], axis=0)
        assert rel_err(a @ (w + mean).T, a_ctx @ w.T) > CONTROL_MIN


def test_thought_matrix_overdetermined_is_a_fit():
    w = rng(2).standard_normal((4, 6))
    a = rng(3).standard_normal((20, 6))
    r = rng(5).standard_normal((20, 4))
    fit = thought_matrix(a, r, w)
    assert not fit.exact and fit.rel_residual > CONTROL_MIN
    ref = np.linalg.lstsq(a, r - a @ w.T, rcond=None)[0].T
    assert rel_err(fit.dw, ref) < 1e-10
    ridge = thought_matrix(a, r, w, ridge=0.5)
    e = r - a @ w.T
    assert rel_err(ridge.dw, np.linalg.solve(a.T @ a + 0.5 * np.eye(6), a.T @ e).T) < 1e-10
    assert not ridge.exact


def test_rank_deficient_warns():
    w = rng(2).standard_normal((4, 8))
    a = rng(3).standard_normal((3, 8))
    a = np.concatenate([a, a[:1] * 2.0])                                  # collinear: rank 3 < 4
    r = rng(6).standard_normal((4, 4))
    with pytest.warns(RankDeficientWarning):
        fit = thought_matrix(a, r, w)
    assert fit.rank == 3 and not fit.exact and fit.rel_residual > CONTROL_MIN
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)
        thought_matrix(a, r, w, ridge=1e-3)                               # ridge: unique, no warning
    with pytest.raises(InputError):
        lstsq_patch(a[:0], r[:0])
    with pytest.raises(InputError):
        lstsq_patch(a, r, ridge=-1.0)
    with pytest.raises(ShapeError):
        thought_matrix(a, r[:, :3], w)


@pytest.mark.llama
def test_condense_exact_with_few_tokens():
    """Llama (M1 + M2 only): <= d independent calibration tokens -> the condensed dense model
    without context reproduces the with-context logits on every calibration query."""
    m = tiny("llama", seed=1, n_layers=3)
    ctx = rng(7).integers(0, 256, 9)
    qs = [rng(8 + i).integers(0, 256, 4) for i in range(6)]              # 24 tokens <= d = 64
    c = condense(m, ctx, qs, method="auto")
    assert c.exact and c.n_tokens == 24 and c.max_rel_residual() < 1e-12
    cm = condensed_model(m, c)
    for q in qs:
        pos = np.arange(9, 13)
        want = m.forward(np.r_[ctx, q])[9:]
        assert rel_err(cm.forward(q, positions=pos), want) < TOL64_MODEL
        assert rel_err(m.forward(q, positions=pos), want) > CONTROL_MIN   # no-context baseline
    ev = evaluate(m, ctx, qs, cm)
    assert abs(ev["kl"]) < 1e-9 and ev["top1"] == 1.0 and ev["kl_base"] > CONTROL_MIN


@pytest.mark.gemma
def test_condense_gemma_reports_residual():
    """Gemma's post-FFW norm needs a per-token scale (M6): a constant scale is a fit, not exact."""
    m = tiny_gemma(seed=0, n_layers=2)
    ctx = rng(9).integers(0, 256, 8)
    qs = [rng(10 + i).integers(0, 256, 3) for i in range(4)]
    params_before = {k: to_numpy(v).copy() for k, v in m.params["layers"][0].items()}
    c = condense(m, ctx, qs, method="m6b")
    assert not c.exact and c.max_rel_residual() > 0
    assert c.fits[0]["gate_proj.weight"].exact                           # the M1 weights are exact
    cm = condensed_model(m, c)
    for k, v in params_before.items():                                     # never mutates the model
        assert np.array_equal(to_numpy(m.params["layers"][0][k]), v)
    assert not np.array_equal(to_numpy(cm.params["layers"][0]["gate_proj.weight"]), params_before["gate_proj.weight"])
    ev = evaluate(m, ctx, qs, cm)
    assert 0 <= ev["top1"] <= 1 and ev["kl"] >= -1e-12


def test_condense_rank_deficient_calibration_warns():
    m = tiny("llama", seed=1, n_layers=1)
    ctx = rng(7).integers(0, 256, 5)
    q = rng(8).integers(0, 256, 3)
    with pytest.warns(RankDeficientWarning):
        c = condense(m, ctx, [q, q])                                      # the same query twice
    assert not c.exact


def test_condense_bad_input():
    m = tiny("llama", seed=1, n_layers=1)
    with pytest.raises(InputError):
        condense(m, [1, 2, 3], [])
    with pytest.raises(InputError):
        condense(m, [], [[1, 2]])
    c = condense(m, [5], [[1, 2]])                                          # single-token context
    assert c.n_tokens == 2
    with pytest.raises(ShapeError):
        condensed_model(m, c.deltas[:0])
    with pytest.raises(ShapeError):
        condensed_model(m, ({"gate_proj.weight": np.zeros((2, 2))},))


def test_condensation_curve_shapes():
    m = tiny_gemma(seed=0, n_layers=2)
    ctx = rng(1).integers(0, 256, 6)
    calib = [rng(2 + i).integers(0, 16, 3) for i in range(4)]
    held = [rng(20 + i).integers(0, 16, 3) for i in range(2)]
    cur = condensation_curve(m, ctx, calib, held, [1, 4])
    assert list(cur["n_tokens"]) == [3, 12]
    for k, v in cur.items():
        assert v.shape == (2,) and np.all(np.isfinite(v))
    assert np.all(cur["kl_base"] == cur["kl_base"][0]) and cur["kl_base"][0] > 1e-3
    assert np.all(cur["kl"] >= -1e-12) and np.all((cur["top1"] >= 0) & (cur["top1"] <= 1))
    # the condensed model is closer to the with-context one on its calibration tokens than the
    # model without context (Gemma's norm-scale patches are fitted by one constant, so even 3
    # tokens leave a residual; the exact case, Llama-style, is test_condense_exact_*)
    assert np.all(cur["calib_kl"] < cur["kl_base"]) and np.all(cur["max_rel_residual"] > 1e-3)


@pytest.mark.real
def test_real_persona(real_gemma):
    """Real Gemma 3 270M: a persona condensed into dense patches, tested on new questions."""
    model, encode = real_gemma
    from minipatch.thought_eval import persona_experiment

    out = persona_experiment(model, encode, "You are a pirate. Answer like a pirate.\n",
                             ["Q: What is your name?\nA:", "Q: Where do you live?\nA:"],
                             ["Q: What do you eat?\nA:"])
    h, c = out["heldout"], out["calib"]
    assert 0 <= h["top1"] <= 1 and h["kl_base"] > 0.5
    # the condensed persona moves the model towards the with-persona one, on the calibration
    # questions and on a new one
    assert c["kl"] < c["kl_base"] and h["kl"] < h["kl_base"], (c, h)
