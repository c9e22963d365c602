"""Vectorized ops: norms, activations, softmax, RoPE, masks, grouped-query attention.

No Python loop over tokens or heads anywhere; each op is tested against a plain loop
reference in ``tests/test_ops.py``. Axis letters: T tokens, S keys, N heads, K kv heads,
G = N/K query heads per kv head, H d_head, D d_model.
"""
from __future__ import annotations

import math

from .backend import namespace


# ---- norms -------------------------------------------------------------------------------

def rms_unit(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last axis (the unscaled RMSNorm)."""
    xp = namespace(x)
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)


def layer_unit(x, eps):
    """(x - mean) / sqrt(var + eps) over the last axis (the unscaled LayerNorm)."""
    xp = namespace(x)
    c = x - xp.mean(x, axis=-1, keepdims=True)
    return c / xp.sqrt(xp.mean(c * c, axis=-1, keepdims=True) + eps)


def rms_norm(x, g, eps, offset=0.0):
    """RMSNorm with multiplier ``offset + g``: offset 0 (Llama: ``g``) or 1 (Gemma: ``1 + g``)."""
    return rms_unit(x, eps) * (g + offset) if offset else rms_unit(x, eps) * g


def layer_norm(x, g, b, eps):
    """LayerNorm with scale ``g`` and bias ``b`` (``b`` may be None)."""
    y = layer_unit(x, eps) * g
    return y if b is None else y + b


# ---- activations -------------------------------------------------------------------------

def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xp = namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def gelu_erf(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), via the array API's lack of erf: a series-free
    identity through tanh is not exact, so erf comes from math on the host for numpy only."""
    xp = namespace(x)
    if hasattr(xp, "erf"):
        return 0.5 * x * (1.0 + xp.erf(x / math.sqrt(2.0)))
    import numpy as np
    from math import erf

    return 0.5 * x * (1.0 + xp.asarray(np.vectorize(erf)(np.asarray(x) / math.sqrt(2.0)), dtype=x.dtype))


def silu(x):
    """SiLU / swish: x * sigmoid(x)."""
    return x * sigmoid(x)


def sigmoid(x):
    xp = namespace(x)
    return 1.0 / (1.0 + xp.exp(-x))


def relu(x):
    xp = namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": gelu_erf, "silu": silu, "relu": relu}


def activation(name):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; one of {sorted(ACTIVATIONS)}") from None


def softcap(x, cap):
    """cap * tanh(x / cap) (Gemma 2 attention and final-logit soft-capping); identity if cap is None."""
    if not cap:
        return x
    xp = namespace(x)
    return cap * xp.tanh(x / cap)


def softmax(x, axis=-1):
    """Numerically stable softmax (subtracts the max)."""
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


# ---- rotary position embedding -----------------------------------------------------------

def rope_angles(positions, base, rotary_dim, dtype):
    """cos, sin of shape [T, rotary_dim/2]: angle[t, i] = pos_t * base^(-2i/rotary_dim).

    Computed in float64 where the backend has it, then cast to ``dtype``.
    """
    xp = namespace(positions)
    hi = xp.float64
    inv = 1.0 / (base ** (xp.astype(xp.arange(0, rotary_dim, 2, device=_dev(positions)), hi) / rotary_dim))
    ang = xp.astype(positions, hi)[:, None] * inv[None, :]
    return xp.astype(xp.cos(ang), dtype), xp.astype(xp.sin(ang), dtype)


def apply_rope(x, cos, sin, rotary_dim, interleaved=False):
    """Rotate the first ``rotary_dim`` features of each head; x is [T, ..., H].

    rotate_half (Llama, Gemma, NeoX): pairs (i, i + rd/2). Interleaved (GPT-J): pairs (2i, 2i+1).
    """
    xp = namespace(x)
    half = rotary_dim // 2
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (half,)
    c, s = xp.reshape(cos, shape), xp.reshape(sin, shape)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        pairs = xp.reshape(rot, rot.shape[:-1] + (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = xp.stack([a * c - b * s, b * c + a * s], axis=-1)
        out = xp.reshape(out, rot.shape)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = xp.concat([a * c - b * s, b * c + a * s], axis=-1)
    return out if rest.shape[-1] == 0 else xp.concat([out, rest], axis=-1)


# ---- masks and attention -----------------------------------------------------------------

def causal_mask(q_pos, k_pos, window=None, q_idx=None, k_idx=None):
    """Boolean [T, S]: key s visible to query t iff k_pos[s] <= q_pos[t] and, with a sliding
    window W, q - k < W. The window is measured on positions, or on ``q_idx``/``k_idx``
    (sequence indices, Hugging Face's convention) when those are given."""
    xp = namespace(q_pos)
    vis = k_pos[None, :] <= q_pos[:, None]
    if window:
        qi = q_pos if q_idx is None else q_idx
        ki = k_pos if k_idx is None else k_idx
        vis = vis & ((qi[:, None] - ki[None, :]) < window)
    return vis


def attention(q, k, v, mask, scale, cap=None):
    """Grouped-query attention, vectorized over heads.

    einsum equivalent: scores 'TKGH,SKH->KGTS', out 'KGTS,SKH->TKGH'.

    Args:
      q: [T, N, H] queries; k, v: [S, K, H] keys and values (N a multiple of K; query head
        n reads kv head n // (N/K), Hugging Face's repeat_kv order).
      mask: [T, S] boolean, True where visible; every row needs a visible key.
      scale: score multiplier (d_head ** -0.5 or query_pre_attn_scalar ** -0.5).
      cap: optional attention logit soft-cap.
    Returns:
      [T, N, H].
    """
    xp = namespace(q, k, v)
    T, N, H = q.shape
    S, K, _ = k.shape
    G = N // K
    qg = xp.permute_dims(xp.reshape(q, (T, K, G, H)), (1, 2, 0, 3))      # [K, G, T, H]
    kk = xp.permute_dims(k, (1, 2, 0))[:, None, :, :]                     # [K, 1, H, S]
    vv = xp.permute_dims(v, (1, 0, 2))[:, None, :, :]                     # [K, 1, S, H]
    scores = softcap((qg @ kk) * scale, cap)                              # [K, G, T, S]
    neg = xp.asarray(-xp.inf, dtype=scores.dtype, device=_dev(scores))
    probs = softmax(xp.where(mask, scores, neg), axis=-1)
    out = probs @ vv                                                      # [K, G, T, H]
    return xp.reshape(xp.permute_dims(out, (2, 0, 1, 3)), (T, N, H))


def _dev(x):
    from .backend import device

    return device(x)
