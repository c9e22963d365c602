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
    """Exact GELU (Hugging Face's ``"gelu"``, GPT-NeoX): 0.5 x (1 + erf(x / sqrt 2)), with :func:`erf`."""
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


_ERF_CUT = 2.0        # series below, continued fraction at and above
_ERF_SERIES = 40      # terms of the positive series (enough for 2 z^2 <= 8 in float64)
_ERFC_CF = 60         # depth of the erfc continued fraction (enough for z >= 2 in float64)


def erf(x):
    """The error function to a few ulp in float64 (and float32), with array-API ops only.

    The array API standard has no ``erf``. For |z| < 2 a series with positive terms (no
    cancellation), evaluated by Horner's rule,

        erf(z) = 2/sqrt(pi) z exp(-z^2) sum_k (2 z^2)^k / (1 * 3 * ... * (2k+1)),

    and for |z| >= 2 the continued fraction

        erfc(z) = exp(-z^2)/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))),

    erf = 1 - erfc. ``exp(-z^2)`` is evaluated on an exact split z = hi + lo (Veltkamp), so
    the rounding of z^2 does not cost digits. Measured against ``math.erf`` on [0, 8]:
    max relative error 6.7e-16, mean 1.2e-16 (``tests/test_families.py``). Odd in z.

    Args:
      x: real floating array of any shape.
    Returns:
      erf(x), same shape and dtype.
    """
    xp = namespace(x)
    a = xp.minimum(xp.abs(x), xp.asarray(30.0, dtype=x.dtype, device=_dev(x)))  # erf(30) == 1
    small = a < _ERF_CUT
    zs = xp.where(small, a, xp.zeros_like(a))                       # series domain
    zc = xp.where(small, xp.full_like(a, _ERF_CUT), a)              # continued-fraction domain
    two_z2 = 2.0 * zs * zs
    s = xp.ones_like(a)
    for k in range(_ERF_SERIES, 0, -1):                             # loop over terms, not elements
        s = 1.0 + s * two_z2 / (2 * k + 1)
    series = (2.0 / math.sqrt(math.pi)) * zs * _exp_minus_sq(zs) * s
    f = zc
    for k in range(_ERFC_CF, 0, -1):
        f = zc + (k / 2.0) / f
    erfc = _exp_minus_sq(zc) / (math.sqrt(math.pi) * f)
    r = xp.where(small, series, 1.0 - erfc)
    return xp.where(x < 0, -r, r)


def _exp_minus_sq(z):
    """exp(-z^2) with z^2 split exactly: z = hi + lo, hi*hi exact (Veltkamp split)."""
    xp = namespace(z)
    bits = xp.finfo(z.dtype).bits
    if bits not in (32, 64):                                           # float16: no split needed
        return xp.exp(-(z * z))
    c = 134217729.0 if bits == 64 else 4097.0                          # 2^27 + 1, 2^12 + 1
    t = z * c
    hi = t - (t - z)
    lo = z - hi
    return xp.exp(-(hi * hi)) * xp.exp(-(2.0 * hi * lo + lo * lo))


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
    vis = k_pos[None, :] <= q_pos[:, None]
    if window:
        qi = q_pos if q_idx is None else q_idx
        ki = k_pos if k_idx is None else k_idx
        vis = vis & ((qi[:, None] - ki[None, :]) < window)
    return vis


def _scores(q, k, scale, cap):
    """Grouped scores [K, G, T, S] ('TKGH,SKH->KGTS') and the kv-major views of k's values."""
    xp = namespace(q, k)
    T, N, H = q.shape
    S, K, _ = k.shape
    qg = xp.permute_dims(xp.reshape(q, (T, K, N // K, H)), (1, 2, 0, 3))   # [K, G, T, H]
    kk = xp.permute_dims(k, (1, 2, 0))[:, None, :, :]                      # [K, 1, H, S]
    return softcap((qg @ kk) * scale, cap)


def _values(v):
    xp = namespace(v)
    return xp.permute_dims(v, (1, 0, 2))[:, None, :, :]                   # [K, 1, S, H]


def _heads(out):
    """[K, G, T, H] -> [T, N, H] (query head n reads kv head n // G)."""
    xp = namespace(out)
    K, G, T, H = out.shape
    return xp.reshape(xp.permute_dims(out, (2, 0, 1, 3)), (T, K * G, H))


def attention(q, k, v, mask, scale, cap=None):
    """Grouped-query attention with an explicit mask, vectorized over heads.

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
    scores = _scores(q, k, scale, cap)
    neg = xp.asarray(-xp.inf, dtype=scores.dtype, device=_dev(scores))
    probs = softmax(xp.where(mask, scores, neg), axis=-1)
    return _heads(probs @ _values(v))


Q_BLOCK = 512      # queries per block of causal_attention
K_BLOCK = 2048     # keys per chunk of its online softmax


def key_range(q_first, q_last, k_pos, window=None, qi_first=None, k_idx=None):
    """[lo, hi): the keys any query of a block can see, as one contiguous index range.

    Keys are sorted by position (and index). A query at position p sees keys with
    k_pos <= p; with a window W also k > q - W on positions (or on indices when ``k_idx``
    is given). For the block's first query q_first and last q_last (host ints), every
    visible key lies in [lo, hi). ``k_pos``/``k_idx`` are host int arrays.
    """
    import numpy as np

    hi = int(np.searchsorted(k_pos, q_last, side="right"))
    if not window:
        return 0, hi
    if k_idx is None:
        lo = int(np.searchsorted(k_pos, q_first - window, side="right"))
    else:
        lo = int(np.searchsorted(k_idx, qi_first - window, side="right"))
    return min(lo, hi), hi


def causal_attention(q, k, v, q_pos, k_pos, scale, window=None, q_idx=None, k_idx=None, cap=None,
                     q_block=None, k_block=None):
    """Causal (optionally sliding-window) grouped-query attention in bounded memory.

    The same function as :func:`attention` with :func:`causal_mask`, computed per block of
    ``q_block`` queries over only the keys that block can see (:func:`key_range`: a sliding
    window skips every key block outside it). A block whose key range is at most
    ``k_block`` long is one masked softmax (exactly :func:`attention`); a longer range is
    swept in chunks of ``k_block`` keys with an online softmax (running max m, normaliser
    l, accumulator o: m' = max(m, rowmax s), o' = o e^{m - m'} + e^{s - m'} v,
    l' = l e^{m - m'} + sum e^{s - m'}; out = o / l). Memory is O(q_block * k_block) per
    head, not O(T * S); the loop runs over blocks, never over tokens or heads.

    Args:
      q: [T, N, H]; k, v: [S, K, H]. q_pos [T], k_pos [S]: backend int arrays, strictly
        increasing, every query sees at least its own key (k_pos contains q_pos).
      window: sliding window W or None; q_idx/k_idx: sequence indices for Hugging Face's
        window convention (None: the window counts positions).
    Returns:
      [T, N, H].
    """
    from .backend import to_numpy

    xp = namespace(q, k, v)
    q_block, k_block = q_block or Q_BLOCK, k_block or K_BLOCK
    T, S = q.shape[0], k.shape[0]
    qp, kp = to_numpy(q_pos), to_numpy(k_pos)
    qi = None if q_idx is None else to_numpy(q_idx)
    ki = None if k_idx is None else to_numpy(k_idx)
    if T <= q_block and S <= k_block:          # the common small case: one masked softmax
        return attention(q, k, v, causal_mask(q_pos, k_pos, window, q_idx, k_idx), scale, cap)
    outs = []
    for r0 in range(0, T, q_block):
        r1 = min(r0 + q_block, T)
        lo, hi = key_range(int(qp[r0]), int(qp[r1 - 1]), kp, window,
                           None if qi is None else int(qi[r0]), ki)
        qb = q[r0:r1, ...]
        sub = (lambda a, b: (q_pos[r0:r1], k_pos[a:b],
                             None if q_idx is None else q_idx[r0:r1], None if k_idx is None else k_idx[a:b]))
        if hi - lo <= k_block:
            qpos, kpos, qix, kix = sub(lo, hi)
            outs.append(attention(qb, k[lo:hi, ...], v[lo:hi, ...],
                                  causal_mask(qpos, kpos, window, qix, kix), scale, cap))
            continue
        m = l = acc = None
        for c0 in range(lo, hi, k_block):
            c1 = min(c0 + k_block, hi)
            qpos, kpos, qix, kix = sub(c0, c1)
            s = _scores(qb, k[c0:c1, ...], scale, cap)                     # [K, G, Tb, Sc]
            vis = causal_mask(qpos, kpos, window, qix, kix)
            neg = xp.asarray(-xp.inf, dtype=s.dtype, device=_dev(s))
            s = xp.where(vis, s, neg)
            cm = xp.max(s, axis=-1, keepdims=True)
            m_new = cm if m is None else xp.maximum(m, cm)
            safe = xp.where(m_new == neg, xp.zeros_like(m_new), m_new)     # rows with nothing seen yet
            e = xp.exp(s - safe)
            pv = e @ _values(v[c0:c1, ...])
            if m is None:
                l, acc = xp.sum(e, axis=-1, keepdims=True), pv
            else:
                alpha = xp.where(m == neg, xp.zeros_like(m), xp.exp(m - safe))
                l = l * alpha + xp.sum(e, axis=-1, keepdims=True)
                acc = acc * alpha + pv
            m = m_new
        outs.append(_heads(acc / l))
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)


def _dev(x):
    from .backend import device

    return device(x)
