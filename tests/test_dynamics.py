"""MATH.md M5: the implicit learning dynamics of a prompt (Dherin et al. 2025)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipatch as mp
from minipatch import lemmas
from minipatch.backend import to_numpy
from minipatch.blocks import attn_sublayer
from minipatch.dynamics import block_dynamics, first_block_dynamics, implicit_steps, prefix_attention
from minipatch.dynamics_model import model_dynamics
from minipatch.errors import InputError, NotControllableError, ShapeError
from minipatch.models import tiny, tiny_gemma
from minipatch.patches import Rank1

from helpers import CONTROL_MIN, TOL64_BLOCK, rel_err

pytestmark = pytest.mark.m5


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n)


def _loop_inputs(model, tokens, query_positions):
    """Reference: A_i of layer 0 by running the attention sublayer on each prefix (a loop)."""
    n = tokens.size - 1
    x = model.embed(tokens, np.r_[np.arange(n), n])
    p = model.params["layers"][0]
    rows = []
    for i in range(n + 1):
        qpos = i if query_positions == "append" else n
        z, _ = attn_sublayer(model.spec, p, np.concatenate([x[:i], x[n:]]), model.cfg, 0, np.r_[np.arange(i), qpos])
        rows.append(model.spec.inner.normalize(p, z, model.cfg)[-1])
    return np.stack(rows)


@pytest.mark.vanilla
@pytest.mark.parametrize("query_positions", ["append", "fixed"])
def test_vanilla_iterates_equal_prefix_patches(query_positions):
    """dW_i of the one-pass dynamics == M1 patch of each prefix computed independently (M3)."""
    m = tiny("vanilla_m3", seed=3, n_layers=1)
    tok = _tokens(10, 1)
    bd = first_block_dynamics(m, tok, query_positions=query_positions)
    ref = _loop_inputs(m, tok, query_positions)
    assert rel_err(bd.a, ref) < TOL64_BLOCK
    s = bd.steps["up_proj.weight"]
    w = m.params["layers"][0]["up_proj.weight"]
    for i in range(1, 10):
        r = lemmas.m1(w, ref[:1], ref[i:i + 1])
        assert rel_err(s.patches.dense(i), r.dense(0)) < TOL64_BLOCK
    assert np.all(s.patches.dense(0) == 0)
    # the final patch absorbs the whole context: f((W + dW_n) A_0 + b) = f(W A_n + b)  (M3)
    p = m.params["layers"][0]
    inner = m.spec.inner
    full = Rank1(s.patches.u[-1:], s.patches.v[-1:])
    got = inner.hidden(p, ref[:1], m.cfg, {"up_proj.weight": full})
    want = inner.hidden(p, ref[-1:], m.cfg)
    assert rel_err(got, want) < TOL64_BLOCK
    assert rel_err(inner.hidden(p, ref[:1], m.cfg), want) > CONTROL_MIN          # negative control


@pytest.mark.vanilla
def test_increment_is_gradient_step():
    """dW_i - dW_{i-1} = -h grad_W L_i, analytic and by central finite differences (M5)."""
    m = tiny("vanilla_m3", seed=4, n_layers=1, d_model=16, d_ff=12, n_heads=2, n_kv_heads=1, d_head=8)
    s = first_block_dynamics(m, _tokens(7, 2)).steps["up_proj.weight"]
    rng = np.random.default_rng(0)
    for i in range(1, s.n_steps + 1):
        inc = s.increments.dense(i - 1)
        dense_diff = s.patches.dense(i) - s.patches.dense(i - 1)
        assert rel_err(inc, dense_diff) < TOL64_BLOCK
        assert rel_err(s.gd_step(i), inc) < TOL64_BLOCK
        assert np.linalg.matrix_rank(inc) == 1
        # numerical gradient of L_i at a random W (L_i is linear, so any point)
        w0 = rng.standard_normal(s.w.shape)
        eps = 1e-3
        grad = np.zeros_like(w0)
        for j, k in np.ndindex(*w0.shape):
            e = np.zeros_like(w0)
            e[j, k] = eps
            grad[j, k] = (s.loss(i, w0 + e) - s.loss(i, w0 - e)) / (2 * eps)
        assert rel_err(-s.lr * grad, inc) < 1e-9
    # negative control: the increment is not the gradient step of the previous loss
    assert rel_err(s.gd_step(1), s.increments.dense(1)) > CONTROL_MIN


@given(n=st.integers(1, 12), seed=st.integers(0, 50))
def test_m5_property(n, seed):
    """Hypothesis over context length and seed: the M5 identities on a Gemma block."""
    m = tiny_gemma(seed=seed % 3, n_layers=1)
    bd = first_block_dynamics(m, _tokens(n + 1, seed))
    for name, s in bd.steps.items():
        steps = s.increments
        total = np.sum(np.stack([steps.dense(i) for i in range(n)]), axis=0)
        assert rel_err(total, s.patches.dense(n)) < 1e-11            # telescoping: sum of steps = dW_n
        assert rel_err(s.gd_step(n), steps.dense(n - 1)) < TOL64_BLOCK


@pytest.mark.m7
@pytest.mark.gemma
def test_model_layer0_matches_block_and_drift_deeper():
    """Multi-layer: layer 0's absorb patches are M5 iterates (no drift); deeper layers drift."""
    m = tiny_gemma(seed=1, n_layers=3, sliding_window=16)
    tok = _tokens(12, 3)
    n = 9
    md = model_dynamics(m, tok, n)
    assert list(md.prefixes) == list(range(n + 1))
    # layer 0 of absorb vs the one-pass block dynamics, on a single-query prompt
    md1 = model_dynamics(m, np.r_[tok[:n], tok[-1]], n)
    bd = first_block_dynamics(m, np.r_[tok[:n], tok[-1]])
    for name in ("gate_proj.weight", "up_proj.weight"):
        for i in range(1, n + 1):
            got = md1.results[i - 1].patches.layers[0][name].dense(0)
            assert rel_err(got, bd.steps[name].patches.dense(i)) < TOL64_BLOCK
        inc_block = bd.steps[name].increment_norms()
        assert rel_err(md1.increments[0][name][:, 0], inc_block) < 1e-10
    for name, g in md.grad[0].items():
        assert np.max(md.drift[0][name]) < 1e-12 * np.max(g)
        assert rel_err(md.grad[0][name], md.increments[0][name]) < 1e-10
    deep = max(np.max(md.drift[l][name] / np.max(md.grad[l][name])) for l in (1, 2) for name in md.grad[l])
    assert deep > CONTROL_MIN      # deeper layers are not one online GD on fixed data
    # the reported increments equal dense differences of the absorbed patches
    for l in range(3):
        for name, inc in md.increments[l].items():
            a, b = md.results[3].patches.layers[l][name], md.results[4].patches.layers[l][name]
            if isinstance(a, Rank1):
                assert abs(np.linalg.norm(b.dense(2) - a.dense(2)) - inc[4, 2]) < 1e-10 * max(inc[4, 2], 1)
    assert md.lr[0].shape == (n + 1, 3)


def _triangle(norms, inc):
    """||dW_k|| - ||dW_{k-1}|| <= ||dW_k - dW_{k-1}|| <= ||dW_k|| + ||dW_{k-1}|| for every
    prefix k and kept token: the increments are differences of the patches the norms measure."""
    lo, hi = np.abs(norms[1:] - norms[:-1]), norms[1:] + norms[:-1]
    slack = 100 * np.finfo(norms.dtype).eps * np.max(norms)      # rounding of the norms themselves
    assert np.all(inc >= lo - slack) and np.all(inc <= hi + slack)
    assert np.allclose(inc[0], norms[1], rtol=1e-12, atol=slack)     # the first step starts at dW = 0


@pytest.mark.m7
def test_model_dynamics_prefix_selection_and_norms():
    m = tiny("llama", seed=2, n_layers=2)
    tok = _tokens(14, 4)
    md = model_dynamics(m, tok, 12, prefixes=[4, 8, 12])
    assert list(md.prefixes) == [0, 4, 8, 12]
    for l in range(2):
        for name, v in md.norms[l].items():
            inc = md.increments[l][name]
            assert v.shape == (4, 2) and np.all(v[0] == 0) and inc.shape == (3, 2)
            _triangle(v, inc)
            # the last prefix's patches are those of absorbing the 12 first tokens afresh
            fresh = mp.absorb(m, tok, range(12)).patches.norms()[l][name]
            np.testing.assert_allclose(v[-1], fresh, rtol=1e-12, atol=1e-14)


def test_backend_block_dynamics(backend):
    xp, dev = backend
    m = tiny_gemma(seed=2, n_layers=1)
    tok = _tokens(6, 5)
    ref = first_block_dynamics(m, tok)
    got = first_block_dynamics(m.to(xp, dev), tok)
    for name, s in ref.steps.items():
        assert rel_err(to_numpy(got.steps[name].u), s.u) < TOL64_BLOCK
        assert rel_err(to_numpy(got.steps[name].v), s.v) < TOL64_BLOCK


def test_single_token_context():
    m = tiny("vanilla_m3", seed=0, n_layers=1)
    s = first_block_dynamics(m, _tokens(2, 6)).steps["up_proj.weight"]
    assert s.n_steps == 1
    assert rel_err(s.increments.dense(0), s.patches.dense(1)) < TOL64_BLOCK
    md = model_dynamics(m, _tokens(2, 6), 1)
    assert md.increments[0]["up_proj.weight"].shape == (1, 1)


def test_bad_input():
    m = tiny("vanilla_m3", seed=0, n_layers=1)
    x = m.embed(_tokens(4), np.arange(4))
    with pytest.raises(InputError):
        prefix_attention(m, x[:0], x[0])                  # empty context
    with pytest.raises(InputError):
        first_block_dynamics(m, _tokens(1))                # no context token
    with pytest.raises(ShapeError):
        prefix_attention(m, x, x[0, :5])
    with pytest.raises(InputError):
        prefix_attention(m, x[:3], x[3], query_positions="middle")
    with pytest.raises(InputError):
        prefix_attention(m, x[:3], x[3], query_positions=[0, 1, 2, 2])   # query not after c_3
    with pytest.raises(NotControllableError):
        implicit_steps(np.ones((3, 4)), np.zeros((2, 4)))  # A_0 = 0: no M1 witness
    with pytest.raises(InputError):
        model_dynamics(m, _tokens(5), 0)
    with pytest.raises(InputError):
        model_dynamics(m, _tokens(5), 5)
    with pytest.raises(InputError):
        model_dynamics(m, _tokens(5), 3, prefixes=[0, 2])
    with pytest.raises(InputError):
        first_block_dynamics(tiny("gpt2", n_layers=1), _tokens(4))   # learned positions + append
    s = implicit_steps(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(InputError):
        s.loss_matrix(0)
    moe = tiny("mixtral", n_layers=1)                 # stacked expert weights: one-block M5 does not apply
    xm = moe.embed(_tokens(4), np.arange(4))
    with pytest.raises(InputError, match="stack of expert weights"):
        block_dynamics(moe, xm[:3], xm[3])


@pytest.mark.real
def test_real_few_shot(real_gemma):
    """Real Gemma 3 270M: a few-shot prompt consumed example by example."""
    model, encode = real_gemma
    from minipatch.dynamics_model import few_shot_dynamics

    ex = [f"Q: {a}+{b}? A: {a + b}\n" for a, b in [(2, 3), (4, 1), (3, 3), (5, 2)]]
    md, bounds = few_shot_dynamics(model, encode, ex, "Q: 1+6? A:")
    assert len(md.prefixes) == len(ex) + 1
    for l in range(model.cfg.n_layers):
        for name, v in md.increments[l].items():
            _triangle(md.norms[l][name], v)
