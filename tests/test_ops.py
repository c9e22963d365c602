"""Every vectorized op against a plain loop reference, plus hand-checked literal cases."""
import math

import numpy as np
import pytest

from minipatch import ops

pytestmark = pytest.mark.ops
rng = np.random.default_rng(0)


def test_rms_norm_both_conventions():
    x, g = rng.standard_normal((5, 8)), rng.standard_normal(8)
    for offset in (0.0, 1.0):
        ref = np.stack([r / math.sqrt(np.mean(r**2) + 1e-6) * (offset + g) for r in x])
        np.testing.assert_allclose(ops.rms_norm(x, g, 1e-6, offset), ref, rtol=1e-14)
    # the two conventions really differ
    assert np.abs(ops.rms_norm(x, g, 1e-6, 1.0) - ops.rms_norm(x, g, 1e-6, 0.0)).max() > 0.1


def test_layer_norm():
    x, g, b = rng.standard_normal((5, 8)), rng.standard_normal(8), rng.standard_normal(8)
    ref = np.stack([(r - r.mean()) / math.sqrt(r.var() + 1e-5) * g + b for r in x])
    np.testing.assert_allclose(ops.layer_norm(x, g, b, 1e-5), ref, rtol=1e-13, atol=1e-14)


def test_activations():
    x = np.linspace(-6, 6, 101)
    gt = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in x]
    np.testing.assert_allclose(ops.gelu_tanh(x), gt, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ops.silu(x), [v / (1 + math.exp(-v)) for v in x], rtol=1e-14)
    np.testing.assert_allclose(ops.relu(x), [max(v, 0.0) for v in x])
    np.testing.assert_allclose(ops.gelu_erf(x), [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x],
                               rtol=1e-13, atol=1e-15)


def test_softmax_and_softcap():
    x = rng.standard_normal((3, 7)) * 50
    ref = np.stack([np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in x])
    np.testing.assert_allclose(ops.softmax(x), ref, rtol=1e-13)
    np.testing.assert_allclose(ops.softcap(x, 30.0), 30 * np.tanh(x / 30), rtol=1e-15)
    assert ops.softcap(x, None) is x


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rd", [8, 4])
def test_rope_against_loop(interleaved, rd):
    T, N, H, base = 6, 3, 8, 500.0
    x = rng.standard_normal((T, N, H))
    pos = np.array([0, 3, 4, 9, 10, 17])
    cos, sin = ops.rope_angles(pos, base, rd, x.dtype)
    out = ops.apply_rope(x, cos, sin, rd, interleaved)
    ref = x.copy()
    for t in range(T):
        for n in range(N):
            for i in range(rd // 2):
                ang = pos[t] * base ** (-2 * i / rd)
                a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
                ref[t, n, a] = x[t, n, a] * math.cos(ang) - x[t, n, b] * math.sin(ang)
                ref[t, n, b] = x[t, n, b] * math.cos(ang) + x[t, n, a] * math.sin(ang)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)


def test_rope_relative_shift_invariance():
    """Attention scores under RoPE depend only on position differences (MATH.md section 0)."""
    q, k = rng.standard_normal((4, 1, 8)), rng.standard_normal((4, 1, 8))
    pos = np.array([0, 2, 5, 6])
    s = []
    for shift in (0, 37):
        c, si = ops.rope_angles(pos + shift, 1e4, 8, q.dtype)
        s.append(ops.apply_rope(q, c, si, 8)[:, 0] @ ops.apply_rope(k, c, si, 8)[:, 0].T)
    np.testing.assert_allclose(s[0], s[1], rtol=1e-10)


def test_sliding_window_mask_literal():
    """Hand-checked: window 3 on positions 0..5 (key j visible iff i - 3 < j <= i)."""
    m = ops.causal_mask(np.arange(6), np.arange(6), window=3).astype(int)
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(m, expected)
    # kept positions 0, 16, 17, 18, 19 with window 4: on positions, 16 cannot see 0;
    # on sequence indices (Hugging Face), index 1..3 still see index 0.
    pos = np.array([0, 16, 17, 18, 19])
    by_pos = ops.causal_mask(pos, pos, 4).astype(int)
    idx = np.arange(5)
    by_idx = ops.causal_mask(pos, pos, 4, idx, idx).astype(int)
    assert by_pos[1:, 0].sum() == 0 and by_idx[1:4, 0].tolist() == [1, 1, 1] and by_idx[4, 0] == 0


@pytest.mark.parametrize("N,K", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_attention_against_per_head_loop(N, K, cap):
    T, H = 7, 5
    q, k, v = rng.standard_normal((T, N, H)), rng.standard_normal((T, K, H)), rng.standard_normal((T, K, H))
    mask = ops.causal_mask(np.arange(T), np.arange(T), window=3)
    out = ops.attention(q, k, v, mask, 0.3, cap)
    ref = np.zeros_like(out)
    for n in range(N):
        kv = n // (N // K)
        for t in range(T):
            s = np.array([q[t, n] @ k[j, kv] * 0.3 for j in range(T)])
            if cap:
                s = cap * np.tanh(s / cap)
            s = np.where(mask[t], s, -np.inf)
            p = np.exp(s - s.max())
            p /= p.sum()
            ref[t, n] = p @ v[:, kv]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    # the einsum forms quoted in the docstring, against the matmul scores and output
    G = N // K
    sc = np.einsum("TKGH,SKH->KGTS", q.reshape(T, K, G, H), k) * 0.3
    if cap:
        sc = cap * np.tanh(sc / cap)
    np.testing.assert_allclose(sc, ops._scores(q, k, 0.3, cap), rtol=1e-13, atol=1e-13)
    pr = np.exp(np.where(mask, sc, -np.inf) - np.max(np.where(mask, sc, -np.inf), axis=-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("KGTS,SKH->TKGH", pr, v).reshape(T, N, H)
    np.testing.assert_allclose(o, out, rtol=1e-12, atol=1e-14)


def test_ops_do_not_mutate():
    x = rng.standard_normal((4, 8))
    x0 = x.copy()
    ops.rms_norm(x, np.ones(8), 1e-6, 1.0), ops.softmax(x), ops.gelu_tanh(x)
    np.testing.assert_array_equal(x, x0)


def test_rel_err():
    """minipatch.metrics.rel_err: relative to the largest reference entry (MATH.md section 8);
    absolute where the reference is all zero."""
    from minipatch.metrics import rel_err

    b = np.array([[1.0, -4.0], [0.5, 2.0]])
    assert rel_err(b, b) == 0.0
    assert rel_err(b + np.array([[0, 0], [0, 1e-3]]), b) == pytest.approx(1e-3 / 4, rel=1e-12)
    assert rel_err(np.float32(3.0), 2.0) == 0.5                     # host float64, scalars broadcast
    assert rel_err(np.full(3, 1e-20), np.zeros(3)) == 1e-20 and rel_err(np.zeros(0), np.zeros(0)) == 0.0
