"""MATH.md M6: the Gemma block theorem, in its three constructions, one block at a time."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipatch as mp
from minipatch import NotControllableError
from minipatch.absorb import check_block
from minipatch.backend import to_numpy
from minipatch.m6 import trust_region
from minipatch.patches import Rank1, Scale

from helpers import CONTROL_MIN, TOL32, TOL64_BLOCK, rel_err

pytestmark = [pytest.mark.m6, pytest.mark.gemma]
METHODS = ["m6a", "m6b", "m6c", "m6d"]


def stream(model, tokens, layer):
    """The residual stream entering ``layer`` on a realistic input."""
    tr = {}
    model.run(tokens, trace=tr, head=False)
    return tr["layers"][layer]["x"]


def context_set(rng, T):
    """A random non-prefix context set: BOS (0) and the last token are kept."""
    k = rng.integers(1, T - 1)
    return np.sort(rng.choice(np.arange(1, T - 1), size=k, replace=False))


@pytest.fixture(scope="module")
def gemma64():
    return mp.models.tiny_gemma(seed=7, n_layers=3)


@pytest.mark.parametrize("method", METHODS)
@given(seed=st.integers(0, 10_000), T=st.integers(3, 14), layer=st.integers(0, 2))
def test_block_theorem_float64(gemma64, method, seed, T, layer):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, gemma64.cfg.vocab_size, T)
    x = stream(gemma64, tok, layer)
    r = check_block(gemma64, layer, x, context_set(rng, T), method)
    assert r.method == method
    err = rel_err(r.patched, r.with_context)
    assert err <= (TOL64_BLOCK if method != "m6a" else 1e-10), err
    assert rel_err(r.unpatched, r.with_context) > CONTROL_MIN          # negative control


@pytest.mark.parametrize("method", METHODS)
def test_block_theorem_float64_fixed(gemma64, method):
    """A fixed case held to the 1e-12 per-block bar for every construction."""
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 256, 16)
    r = check_block(gemma64, 1, stream(gemma64, tok, 1), [2, 3, 5, 8, 9, 13], method)
    assert rel_err(r.patched, r.with_context) <= TOL64_BLOCK
    assert rel_err(r.unpatched, r.with_context) > CONTROL_MIN


@pytest.mark.parametrize("method", METHODS)
def test_block_theorem_float32(method):
    model = mp.models.tiny_gemma(seed=3, n_layers=2, dtype=np.float32)
    rng = np.random.default_rng(1)
    tok = rng.integers(0, 256, 20)
    r = check_block(model, 1, stream(model, tok, 1), np.arange(1, 12), method)
    assert r.patched.dtype == np.float32
    assert rel_err(r.patched, r.with_context) <= TOL32
    assert rel_err(r.unpatched, r.with_context) > CONTROL_MIN


@pytest.mark.parametrize("method", METHODS)
def test_what_each_construction_patches(gemma64, method):
    rng = np.random.default_rng(2)
    tok = rng.integers(0, 256, 10)
    assert gemma64.cfg.layer_type(2) == "full"   # every later kept token sees the context
    r = check_block(gemma64, 2, stream(gemma64, tok, 2), [1, 2, 3, 4], method)
    p = r.patch
    assert isinstance(p["gate_proj.weight"], Rank1) and isinstance(p["up_proj.weight"], Rank1)
    assert p["gate_proj.weight"].v is p["up_proj.weight"].v        # shared v = n/||n||^2
    scale = p["mlp_post_norm.weight"]
    assert isinstance(scale, Scale)
    if method == "m6a":
        assert "down_proj.weight" not in p and scale.mul is None and scale.add.shape == (6, 64)
    elif method == "m6d":
        assert isinstance(p["down_proj.weight"], Rank1) and scale.mul is None
        # where |s| is above the floor, the elementwise patch is s (R - 1): one R per token
        sv = gemma64.params["layers"][2]["mlp_post_norm.weight"] + 1.0
        big = np.abs(sv) > 0.1 * np.sqrt(np.mean(sv**2))
        ratio = to_numpy(scale.add)[:, big] / sv[big]
        np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-6, atol=1e-9)
    elif method == "m6b":
        assert isinstance(p["down_proj.weight"], Rank1) and scale.add is None and scale.mul.shape == (6, 1)
    else:
        assert isinstance(p["down_proj.weight"], Rank1) and scale.add.shape == (6, 64)
    for name, q in p.items():       # rank check of every weight patch
        if isinstance(q, Rank1):
            # kept token 0 (BOS) precedes the context: nothing to absorb, so the inner
            # patches are 0 (M6b/M6c still rewrite W_down's output there: a rank-1 patch
            # that the scale patch undoes)
            r0 = np.linalg.matrix_rank(to_numpy(q.dense(0)))
            assert r0 == (0 if name != "down_proj.weight" else 1), name
            for t in range(1, 6):
                assert np.linalg.matrix_rank(to_numpy(q.dense(t))) == 1, name


def test_m6c_residual_is_smallest():
    """M6c minimises what the elementwise scale must absorb (MATH.md M6c): its residual
    ||t - s * rms_unit(W_down' h)|| is at most M6a's ||t - s u^C|| = ||delta||."""
    from minipatch.m6 import m6a, m6c
    from minipatch.ops import rms_unit

    rng = np.random.default_rng(4)
    T, D, F = 6, 16, 24
    s = np.exp(0.5 * rng.standard_normal(D))
    h, W = rng.standard_normal((T, F)), rng.standard_normal((D, F)) / np.sqrt(F)
    m = h @ W.T
    delta = 0.5 * rng.standard_normal((T, D))
    pc = m6c(s, 1e-6, h, m, delta)
    r = rms_unit(pc.down.apply(h, m), 1e-6)
    t = s * rms_unit(m, 1e-6) + delta
    assert np.all(np.linalg.norm(t - s * r, axis=1) <= np.linalg.norm(delta, axis=1) + 1e-12)
    pa = m6a(s, 1e-6, h, m, delta)
    # the patched post-norm output is t for both
    np.testing.assert_allclose(pa.scale.multiplier(s) * rms_unit(m, 1e-6), t, rtol=1e-12)
    np.testing.assert_allclose(pc.scale.multiplier(s) * r, t, rtol=1e-10)


def test_trust_region_regular_and_hard_case():
    rng = np.random.default_rng(5)
    D = 8
    s = np.exp(0.5 * rng.standard_normal(D))
    t = rng.standard_normal((4, D))
    y = trust_region(s, t)
    np.testing.assert_allclose(np.mean(y**2, axis=1), 1.0, rtol=1e-12)
    # optimality against random feasible points
    for _ in range(200):
        z = rng.standard_normal(D)
        z /= np.sqrt(np.mean(z**2))
        assert np.all(np.sum((s * y - t) ** 2, 1) <= np.sum((s * z - t) ** 2, 1) + 1e-9)
    # hard case: t has no component on the coordinates of smallest s^2, and is small
    s_h = np.array([0.5, 0.5, 1.0, 2.0, 3.0])
    t_h = np.array([[0.0, 0.0, 0.1, 0.2, -0.1]])
    y_h = trust_region(s_h, t_h)
    np.testing.assert_allclose(np.mean(y_h**2), 1.0, rtol=1e-12)
    assert np.all(y_h[0, :2] != 0)           # the free coordinates are filled
    mu = s_h.min() ** 2                       # and the rest follows y = s t / (s^2 - mu)
    np.testing.assert_allclose(y_h[0, 2:], s_h[2:] * t_h[0, 2:] / (s_h[2:] ** 2 - mu), rtol=1e-12)


def test_hard_case_block_theorem():
    """M6c through a real block where t vanishes on the smallest-multiplier coordinates."""
    from minipatch.m6 import m6c
    from minipatch.ops import rms_unit

    rng = np.random.default_rng(6)
    T, D, F = 3, 6, 10
    s = np.array([0.3, 0.3, 1.0, 1.5, 2.0, 2.5])
    h, W = rng.standard_normal((T, F)), rng.standard_normal((D, F))
    m = h @ W.T
    u = rms_unit(m, 1e-6)
    t = np.zeros((T, D))
    t[:, 2:] = 0.05 * rng.standard_normal((T, D - 2))
    delta = t - s * u                          # so that the goal is exactly t
    pc = m6c(s, 1e-6, h, m, delta)
    out = pc.scale.multiplier(s) * rms_unit(pc.down.apply(h, m), 1e-6)
    np.testing.assert_allclose(out, t, atol=1e-12)


def test_m6a_zero_coordinate_and_auto(gemma64):
    """An exact zero in u^C: M6a has no witness, 'auto' picks another construction."""
    from minipatch.m6 import construct, m6a

    rng = np.random.default_rng(8)
    D, F = 6, 5
    s = np.exp(0.3 * rng.standard_normal(D))
    h = rng.standard_normal((2, F))
    W = rng.standard_normal((D, F))
    W[3] = 0.0                                 # coordinate 3 of m^C is exactly 0
    m, delta = h @ W.T, rng.standard_normal((2, D))
    with pytest.raises(NotControllableError) as e:
        m6a(s, 1e-6, h, m, delta)
    assert "u^C" in e.value.quantity and e.value.position == 0
    name, _ = construct("auto", s, 1e-6, h, m, delta)
    assert name == "m6d"



def test_m6c_with_zero_multiplier_entries():
    """1 + g = 0 at some coordinates (as in real Gemma 3 270M's post-FFW norms, layers 1, 3, 4):
    M6b has no witness, M6c (solving with those s_i replaced by 1) and M6a stay exact."""
    from minipatch.m6 import construct, m6b, m6c
    from minipatch.ops import rms_unit

    rng = np.random.default_rng(10)
    T, D, F = 4, 8, 12
    s = np.exp(0.3 * rng.standard_normal(D))
    s[[1, 5]] = 0.0
    h, W = rng.standard_normal((T, F)), rng.standard_normal((D, F))
    m, delta = h @ W.T, rng.standard_normal((T, D))       # delta != 0 where s = 0
    t = s * rms_unit(m, 1e-6) + delta
    pc = m6c(s, 1e-6, h, m, delta)
    out = pc.scale.multiplier(s) * rms_unit(pc.down.apply(h, m), 1e-6)
    assert rel_err(out, t) <= TOL64_BLOCK
    with pytest.raises(NotControllableError):
        m6b(s, 1e-6, h, m, delta)
    assert construct("auto", s, 1e-6, h, m, delta)[0] == "m6d"
    pd = construct("m6d", s, 1e-6, h, m, delta)[1]
    out = pd.scale.multiplier(s) * rms_unit(pd.down.apply(h, m), 1e-6)
    assert rel_err(out, t) <= TOL64_BLOCK


def test_m6b_needs_nonzero_multiplier():
    from minipatch.m6 import m6a, m6b

    rng = np.random.default_rng(9)
    s = np.array([1.0, 0.0, 2.0, 0.5])         # 1 + g = 0 at coordinate 1
    h = rng.standard_normal((2, 3))
    m, delta = h @ rng.standard_normal((4, 3)).T, rng.standard_normal((2, 4))
    with pytest.raises(NotControllableError, match="multiplier"):
        m6b(s, 1e-6, h, m, delta)
    m6a(s, 1e-6, h, m, delta)   # M6a still works


def test_unknown_method(gemma64):
    """A name that is not a post-norm construction (also M2, a linear outer's) is a MethodError
    listing the family's constructions."""
    from minipatch.errors import MethodError

    for bad in ("m6z", "m2", "bias", "one"):
        with pytest.raises(MethodError, match="m6d") as e:
            mp.absorb(gemma64, [1, 2, 3, 4], [1, 2], method=bad)
        assert e.value.allowed == ("auto", "m6a", "m6b", "m6c", "m6d") and isinstance(e.value, ValueError)


def test_m6d_is_well_conditioned_for_large_delta():
    """When the context moves the stream far (delta >> s u^C, as when every earlier token is
    context) and some multipliers are tiny, M6c's y*_i ~ s_i t_i / |mu| is tiny there and its
    residual scale patch ~ |mu| / s_i is huge, amplifying rounding; M6d's patch is s (R - 1)
    above the floor: under a 1e-13 perturbation of the recomputed hidden its error stays at
    that level."""
    from minipatch.m6 import m6c, m6d
    from minipatch.ops import rms_unit

    rng = np.random.default_rng(12)
    T, D, F = 8, 64, 96
    s = np.exp(0.5 * rng.standard_normal(D))
    s[:4] = [1e-3, -2e-3, 5e-4, 1e-2]       # tiny multipliers, as in real Gemma 3 270M
    h, W = rng.standard_normal((T, F)), rng.standard_normal((D, F)) / np.sqrt(F)
    m = h @ W.T
    delta = 30.0 * rng.standard_normal((T, D)) * rng.standard_normal((1, D)) ** 2
    t = s * rms_unit(m, 1e-6) + delta
    h_noisy = h * (1 + 1e-13 * rng.standard_normal(h.shape))
    errs, sizes = {}, {}
    for name, fn in (("m6c", m6c), ("m6d", m6d)):
        p = fn(s, 1e-6, h, m, delta)
        out = p.scale.multiplier(s) * rms_unit(p.down.apply(h_noisy, h_noisy @ W.T), 1e-6)
        errs[name], sizes[name] = rel_err(out, t), float(np.max(np.abs(p.scale.add)))
    assert errs["m6d"] <= 1e-12 < errs["m6c"]
    assert sizes["m6d"] < sizes["m6c"] / 10
