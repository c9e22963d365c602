"""MATH.md M1 and M2: the rank-1 absorption lemmas."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipatch import NotControllableError
from minipatch.backend import to_numpy
from minipatch.lemmas import m1, m2, pinv_form

from helpers import TOL64_BLOCK, rel_err


def _draw(seed, T, out, inp, xp=np, dev=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inp)) / np.sqrt(inp)
    a, a2 = rng.standard_normal((T, inp)), rng.standard_normal((T, inp))
    conv = (lambda z: xp.asarray(z, device=dev)) if dev is not None else xp.asarray
    return conv(w), conv(a), conv(a2)


@pytest.mark.m1
@given(seed=st.integers(0, 2**31), T=st.integers(1, 6), out=st.integers(1, 9), inp=st.integers(1, 9))
def test_m1_identity_rank_and_min_norm(seed, T, out, inp):
    w, a, a2 = _draw(seed, T, out, inp)
    p = m1(w, a, a2)
    got = p.apply(a, a @ w.T)                    # (W + dW_t) a_t for every t
    want = a2 @ w.T                              # W a'_t
    assert rel_err(got, want) <= TOL64_BLOCK
    assert rel_err(a @ w.T, want) > 1e-3 or np.allclose(a, a2)   # negative control
    for t in range(T):
        d = to_numpy(p.dense(t))
        assert np.linalg.matrix_rank(d) <= 1
        np.testing.assert_allclose(d, pinv_form(w, a[t], a2[t]), rtol=1e-10, atol=1e-13)
        # dense application agrees with the factored one
        np.testing.assert_allclose((w + d) @ a[t], a2[t] @ w.T, rtol=1e-10, atol=1e-12)


@pytest.mark.m1
def test_m1_minimum_norm_and_non_uniqueness():
    w, a, a2 = _draw(3, 1, 6, 5)
    d = p_dense = to_numpy(m1(w, a, a2).dense(0))
    rng = np.random.default_rng(0)
    # any dW' with dW' a = 0 gives another solution, never a smaller one
    for _ in range(20):
        z = rng.standard_normal((6, 5))
        z -= np.outer(z @ a[0], a[0]) / (a[0] @ a[0])     # z a = 0
        other = p_dense + z
        np.testing.assert_allclose((w + other) @ a[0], w @ a2[0], rtol=1e-10)
        assert np.linalg.norm(other) >= np.linalg.norm(d) - 1e-12
    assert np.linalg.matrix_rank(d) == 1


@pytest.mark.m2
@given(seed=st.integers(0, 2**31), T=st.integers(1, 6), out=st.integers(1, 9), inp=st.integers(1, 9))
def test_m2_identity_and_rank(seed, T, out, inp):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inp))
    h, delta = rng.standard_normal((T, inp)), rng.standard_normal((T, out))
    p = m2(h, delta)
    got = p.apply(h, h @ w.T)
    assert rel_err(got, h @ w.T + delta) <= TOL64_BLOCK
    assert rel_err(h @ w.T, h @ w.T + delta) > 1e-3                         # negative control
    for t in range(T):
        d = to_numpy(p.dense(t))
        assert np.linalg.matrix_rank(d) == 1
        np.testing.assert_allclose(d, delta[t][:, None] @ np.linalg.pinv(h[t][:, None]), rtol=1e-10, atol=1e-13)


@pytest.mark.m1
@pytest.mark.m2
def test_zero_inputs_raise_named_error():
    w, a, a2 = _draw(0, 3, 4, 5)
    a = a.copy()
    a[1] = 0.0
    with pytest.raises(NotControllableError) as e:
        m1(w, a, a2)
    assert e.value.position == 1 and e.value.value == 0.0 and "||a||^2" in str(e.value)
    with pytest.raises(NotControllableError):
        m2(a, np.ones((3, 4)))
    # subnormal norms count as zero rather than producing inf
    a[1] = 1e-170
    with pytest.raises(NotControllableError):
        m1(w, a, a2)


@pytest.mark.m1
@pytest.mark.backend
def test_m1_on_every_backend(backend):
    xp, dev = backend
    w, a, a2 = _draw(5, 4, 6, 7, xp, dev)
    p = m1(w, a, a2)
    assert rel_err(p.apply(a, a @ w.mT), a2 @ w.mT) <= TOL64_BLOCK


@pytest.mark.m1
def test_lemmas_do_not_mutate():
    w, a, a2 = _draw(1, 3, 4, 5)
    copies = [x.copy() for x in (w, a, a2)]
    m1(w, a, a2), m2(a, a2[:, :4] if a2.shape[1] >= 4 else a2)
    for x, c in zip((w, a, a2), copies):
        np.testing.assert_array_equal(x, c)
