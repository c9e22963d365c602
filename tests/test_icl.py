"""In-context linear regression with a linear-self-attention block (M3, M5; von Oswald et al.
2023; Dherin et al. 2025)."""
from __future__ import annotations

import numpy as np
import pytest

from minipatch import icl
from minipatch.backend import to_numpy
from minipatch.errors import NotControllableError, ShapeError

from helpers import CONTROL_MIN, TOL64_BLOCK, rel_err

pytestmark = [pytest.mark.m3, pytest.mark.m5, pytest.mark.vanilla]

D = 6


@pytest.fixture(scope="module")
def tasks():
    return icl.sample_tasks(5, 24, 7, D, seed=0)


def test_forward_is_one_gd_step(tasks):
    b = icl.gd_block(D, eta=0.7)
    got = icl.predict(b, tasks["x"], tasks["y"], tasks["xq"])
    want = icl.gd_prediction(tasks["x"], tasks["y"], tasks["xq"], eta=0.7)
    assert rel_err(got, want) < TOL64_BLOCK


def test_prefixes_match_loop(tasks):
    """The cumulative-sum causal pass == attention recomputed on every prefix (loop)."""
    b = icl.random_block(D, seed=1)
    x, y, xq = tasks["x"][0], tasks["y"][0], tasks["xq"][0]
    a = icl.attention_prefixes(b, x, y, xq)
    z, zq = icl.tokens(x, y), icl.tokens(xq)
    for i in range(x.shape[0] + 1):
        ref = zq.copy()
        if i:
            s = z[:i] @ b.w_kq @ zq.T                       # [i, Q]
            ref = ref + (s.T @ (z[:i] @ b.w_pv.T)) / i
        assert rel_err(a[:, i], ref) < TOL64_BLOCK


@pytest.mark.parametrize("kind", ["gd", "tanh", "relu"])
def test_m3_patched_equals_with_context(tasks, kind):
    b = icl.gd_block(D) if kind == "gd" else icl.random_block(D, seed=2, act=kind)
    want = icl.predict(b, tasks["x"], tasks["y"], tasks["xq"])
    p = icl.implicit_update(b, tasks["x"], tasks["y"], tasks["xq"])
    got = icl.predict_patched(b, p, tasks["xq"])
    assert rel_err(got, want) < TOL64_BLOCK
    base = icl.readout(b, icl.tokens(tasks["xq"]))
    assert rel_err(base, want) > CONTROL_MIN                       # negative control
    dense = to_numpy(p.u)[0, 0][:, None] * to_numpy(p.v)[0, 0][None, :]
    assert np.linalg.matrix_rank(dense) == 1


@pytest.mark.parametrize("kind", ["gd", "tanh"])
def test_m5_dynamics(tasks, kind):
    b = icl.gd_block(D) if kind == "gd" else icl.random_block(D, seed=3, act=kind)
    x, y, xq = tasks["x"][1], tasks["y"][1], tasks["xq"][1]
    s = icl.implicit_dynamics(b, x, y, xq[0])
    for i in range(1, x.shape[0] + 1):
        # iterate i = the implicit update of the prefix of length i, computed independently
        p = icl.implicit_update(b, x[:i], y[:i], xq[:1])
        assert rel_err(s.patches.dense(i), p.dense(0)) < TOL64_BLOCK
        assert rel_err(s.gd_step(i), s.increments.dense(i - 1)) < TOL64_BLOCK
    # predictions after each prefix from the patched weights == with-context prefix predictions
    pp = icl.predict_prefixes(b, x, y, xq[:1])[0]
    got = icl.readout(b, icl.tokens(xq[:1]), s.patches)           # row i: W + dW_i on A_0
    assert rel_err(got, pp) < TOL64_BLOCK


def test_increments_decay_and_loss_falls():
    b = icl.gd_block(D)
    t = icl.sample_tasks(64, 64, 1, D, seed=5)
    incs = np.stack([icl.implicit_dynamics(b, t["x"][k], t["y"][k], t["xq"][k, 0]).increment_norms()
                     for k in range(64)]).mean(0)
    assert incs[-16:].mean() < 0.2 * incs[:4].mean()
    pred = icl.predict_prefixes(b, t["x"], t["y"], t["xq"])[:, 0, 1:]      # [B, N]
    loss = ((pred - t["yq"]) ** 2).mean(0)
    assert loss[-8:].mean() < 0.5 * loss[:4].mean()


def test_readout_grad_finite_differences(tasks):
    b = icl.random_block(D, hidden=5, seed=4, act="tanh")
    x, y = tasks["x"][2], tasks["y"][2]
    g = icl.readout_grad(b, x, y)
    num = np.zeros_like(g)
    eps = 1e-6
    for j, k in np.ndindex(*g.shape):
        e = np.zeros_like(g)
        e[j, k] = eps
        num[j, k] = (icl.readout_loss(b, b.w + e, x, y) - icl.readout_loss(b, b.w - e, x, y)) / (2 * eps)
    assert rel_err(g, num) < 1e-7


def test_alignment_with_explicit_gd(tasks):
    """One query: dW_q acts on x_q as the explicit GD step; over >= d queries the least-squares
    condensation of the implicit updates IS the explicit step (analytic block)."""
    b = icl.gd_block(D)
    x, y = tasks["x"][3], tasks["y"][3]
    ex = icl.explicit_step(b, x, y)
    xq = np.random.default_rng(0).standard_normal((3 * D, D))
    p = icl.implicit_update(b, x, y, xq)
    zq = icl.tokens(xq)
    assert rel_err(np.einsum("qf,qp,qp->qf", p.u, p.v, zq), zq @ ex.T) < TOL64_BLOCK
    assert icl.cosine(p.dense(0), ex) < 0.99                       # one query: only a projection
    dw, fit = icl.condensed_update(b, x, y, xq)
    assert rel_err(dw, ex) < TOL64_BLOCK and fit.rel_residual < 1e-12
    assert abs(icl.cosine(dw, ex) - 1) < 1e-12


def test_backend(backend):
    xp, dev = backend
    b = icl.random_block(D, seed=6)
    t = icl.sample_tasks(2, 5, 3, D, seed=1)
    ref = icl.predict_patched(b, icl.implicit_update(b, t["x"], t["y"], t["xq"]), t["xq"])
    mv = lambda a: xp.asarray(a, device=dev) if dev is not None else xp.asarray(a)
    bx = icl.LSABlock(*(mv(a) for a in (b.w_kq, b.w_pv, b.w, b.b, b.w_out)), b.act)
    got = icl.predict_patched(bx, icl.implicit_update(bx, mv(t["x"]), mv(t["y"]), mv(t["xq"])), mv(t["xq"]))
    assert rel_err(to_numpy(got), ref) < TOL64_BLOCK


def test_bad_input(tasks):
    b = icl.gd_block(D)
    with pytest.raises(ShapeError):
        icl.attention_prefixes(b, tasks["x"][0, :0], tasks["y"][0, :0], tasks["xq"][0])   # empty context
    with pytest.raises(ShapeError):
        icl.attention_prefixes(b, tasks["x"][0], tasks["y"][0, :3], tasks["xq"][0])
    with pytest.raises(NotControllableError):
        icl.implicit_update(b, tasks["x"][0], tasks["y"][0], np.zeros((1, D)))            # x_q = 0
    s = icl.implicit_dynamics(b, tasks["x"][0, :1], tasks["y"][0, :1], tasks["xq"][0, 0])  # one example
    assert s.n_steps == 1 and rel_err(s.increments.dense(0), s.patches.dense(1)) < TOL64_BLOCK
