"""A block family is a declaration: where its norms sit, and its MLP's inner and outer parts.

:class:`BlockSpec` drives one generic forward (:func:`attn_sublayer`, :func:`block_forward`)
and one generic theorem (:func:`layer_patch`, the M8 witness pair of
``minipatch.controllability``). Layouts:

  sequential  z = x + Attn(x);          out = z + g(f(z))           (Llama, Gemma, GPT-2, OLMo 2)
  postnorm    z = LN(x + Attn(x));      out = LN(z + g(f(z)))       (original Transformer, BERT)
  parallel    out = x + Attn(x) + g(f(x))                           (GPT-J, GPT-NeoX, PaLM)
  noskip      z = Attn(x);              out = g(f(z))               (Dherin et al. M3)

Attention may have a pre-norm (``attn_norm``) and a post-norm on its output
(``attn_post_norm``, Gemma and OLMo 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..backend import namespace
from ..controllability import linear_shapes, m8, norm_shapes, take_rows
from ..ops import apply_rope, causal_attention, rope_angles
from ..patches import linear, norm


@dataclass(frozen=True)
class BlockSpec:
    """Declaration of one block family.

    Attributes:
      layout: 'sequential' | 'postnorm' | 'parallel' | 'noskip'.
      inner, outer: the MLP's input- and output-controllable parts.
      attn_pre_norm: apply ``attn_norm`` before attention.
      attn_post_norm: apply ``attn_post_norm`` to the attention output (Gemma, OLMo 2).
      res_norms: postnorm layout's norms after each residual add.
    """

    layout: str
    inner: object
    outer: object
    attn_pre_norm: bool = True
    attn_post_norm: bool = False
    res_norms: tuple = ("attn_res_norm", "mlp_res_norm")

    def layer_param_names(self, cfg):
        """Every per-layer parameter name with its shape (for init, loaders and validation)."""
        return layer_shapes(self, cfg)


def project_qkv(p, x, cfg, layer, positions, patch=None):
    """q [T, N, H], k [T, K, H], v [T, K, H]: projections, q/k norms, RoPE at ``positions``."""
    xp = namespace(x)
    T, N, K, H = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    q, k, v = (linear(p, n, x, patch) for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.qk_norm == "full":
        q, k = norm(p, "q_norm", q, cfg, kind="rms"), norm(p, "k_norm", k, cfg, kind="rms")
    q, k, v = xp.reshape(q, (T, N, H)), xp.reshape(k, (T, K, H)), xp.reshape(v, (T, K, H))
    if cfg.qk_norm == "head":
        q, k = norm(p, "q_norm", q, cfg, kind="rms"), norm(p, "k_norm", k, cfg, kind="rms")
    if cfg.pos_embedding == "rope":
        rd = cfg.rotary_dim or H
        cos, sin = rope_angles(positions, cfg.rope_base(layer), rd, x.dtype)
        q = apply_rope(q, cos, sin, rd, cfg.rope_interleaved)
        k = apply_rope(k, cos, sin, rd, cfg.rope_interleaved)
    return q, k, v


def attention_output(spec, p, o, cfg, patch=None):
    """From the heads' outputs o [T, N, H] to the sublayer output a [T, D]: o_proj, then the
    post-attention norm where the family has one (Gemma, OLMo 2)."""
    return attention_parts(spec, p, o, cfg, patch)[1]


def attention_parts(spec, p, o, cfg, patch=None):
    """(o_proj output [T, D], sublayer output a [T, D]): the two differ only where the family
    has a post-attention norm (Gemma, OLMo 2)."""
    xp = namespace(o)
    a = linear(p, "o_proj", xp.reshape(o, (o.shape[0], o.shape[1] * o.shape[2])), patch)
    return a, (norm(p, "attn_post_norm", a, cfg, patch) if spec.attn_post_norm else a)


def mlp_input(spec, p, x, a, cfg, patch=None):
    """The MLP input z from the layer input x and the attention output a, by layout."""
    if spec.layout == "parallel":
        return x
    if spec.layout == "noskip":
        return a
    if spec.layout == "postnorm":
        return norm(p, spec.res_norms[0], x + a, cfg, patch)
    return x + a


class AttnValues(NamedTuple):
    """What the attention sublayer gives for T query tokens.

    z: [T, D] the MLP input. a: [T, D] the attention output (after o_proj and any
    post-attention norm). k, v: [T, K, H] these tokens' keys (after k-norm and RoPE) and
    values, for a KV cache. o: [T, D] the o_proj output (a before any post-attention norm).
    """

    z: object
    a: object
    k: object
    v: object
    o: object = None


class KV(NamedTuple):
    """Keys and values of earlier tokens for one layer: k, v [S, K, H] and their positions
    ``pos`` [S] (backend ints) and sequence indices ``idx`` [S] (or None: not needed)."""

    k: object
    v: object
    pos: object
    idx: object = None


def attention_values(spec, p, x, cfg, layer, positions, patch=None, index=None, past=None):
    """The attention sublayer on x [T, D] at ``positions``, optionally after cached tokens.

    Args:
      positions: int [T] (RoPE and causality), strictly increasing, after ``past.pos``.
      index: int [T] sequence indices; when given, the sliding window is measured on them
        (Hugging Face's convention) instead of on positions.
      past: :class:`KV` of earlier tokens (None: the T tokens attend among themselves).
    Returns:
      :class:`AttnValues`.
    """
    q, k, v = project_qkv(p, norm(p, "attn_norm", x, cfg) if spec.attn_pre_norm else x,
                          cfg, layer, positions, patch)
    o = attend(q, k, v, cfg, layer, positions, index, past)
    o_lin, a = attention_parts(spec, p, o, cfg, patch)
    return AttnValues(mlp_input(spec, p, x, a, cfg, patch), a, k, v, o_lin)


def attend(q, k, v, cfg, layer, positions, index=None, past=None):
    """The heads' outputs o [T, N, H]: queries q [T, N, H] over the cached keys and values of
    ``past`` (a :class:`KV` or None) followed by these tokens' own k, v [T, K, H]."""
    xp = namespace(q)
    if past is None:
        kk, vv, kpos, kidx = k, v, positions, index
    else:
        kk, vv = xp.concat([past.k, k], axis=0), xp.concat([past.v, v], axis=0)
        kpos = xp.concat([past.pos, positions], axis=0)
        kidx = None if index is None else xp.concat([past.idx, index], axis=0)
    return causal_attention(q, kk, vv, positions, kpos, cfg.score_scale, cfg.window(layer),
                            index, kidx, cfg.attn_softcap)


def attention_values_many(spec, p, x, cfg, layer, positions, pasts, indices=None):
    """:func:`attention_values` for S sequences advanced by one token each: row i of x [S, D]
    is sequence i's new token at ``positions[i]``, after its cached ``pasts[i]`` (a
    :class:`KV`). Projections and the output run on all rows at once; the attention itself
    per sequence (their caches differ in length). ``indices``: [S] sequence indices (Hugging
    Face's window convention) or None.
    """
    xp = namespace(x)
    q, k, v = project_qkv(p, norm(p, "attn_norm", x, cfg) if spec.attn_pre_norm else x,
                          cfg, layer, positions)
    o = xp.concat([attend(q[i:i + 1, ...], k[i:i + 1, ...], v[i:i + 1, ...], cfg, layer, positions[i:i + 1],
                          None if indices is None else indices[i:i + 1], past)
                   for i, past in enumerate(pasts)], axis=0)
    o_lin, a = attention_parts(spec, p, o, cfg)
    return AttnValues(mlp_input(spec, p, x, a, cfg), a, k, v, o_lin)


def own_attention_values(spec, p, x, cfg, patch=None):
    """The attention sublayer for T tokens of which each sees only itself (a token whose
    context is all absorbed, M7's ``'all_but_last'``): the softmax over one key is exactly 1,
    so each head outputs its token's value (query head n reads kv head n // G); positions,
    queries and keys do not enter. Equal to :func:`attention_values` run on each row alone.
    Returns:
      :class:`AttnValues` without keys and values (k, v None).
    """
    xp = namespace(x)
    T, N, K, H = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    v = linear(p, "v_proj", norm(p, "attn_norm", x, cfg) if spec.attn_pre_norm else x, patch)
    o = xp.reshape(xp.broadcast_to(xp.reshape(v, (T, K, 1, H)), (T, K, N // K, H)), (T, N, H))
    o_lin, a = attention_parts(spec, p, o, cfg, patch)
    return AttnValues(mlp_input(spec, p, x, a, cfg, patch), a, None, None, o_lin)


def attn_sublayer(spec, p, x, cfg, layer, positions, patch=None, trace=None, index=None):
    """From the layer input x [T, D] to (z, a): the MLP input and the attention output.

    See :func:`attention_values` (which also returns keys and values for a cache);
    ``trace`` (optional dict) receives x, a, z.
    """
    r = attention_values(spec, p, x, cfg, layer, positions, patch, index)
    if trace is not None:
        trace.update(x=x, a=r.a, z=r.z)
    return r.z, r.a


class MLPValues(NamedTuple):
    """The MLP sublayer's values: h [T, F] hidden (a dict for MoE), d the down-projection
    output, m the outer part's output (d after any post-norm), out [T, D] the block output."""

    h: object
    d: object
    m: object
    out: object


def mlp_values(spec, p, x, z, a, cfg, patch=None):
    """From the MLP input z (and the layer input x, attention output a) to the block output."""
    h = spec.inner.forward(p, z, cfg, patch)
    d, m = spec.outer.parts(p, h, cfg, patch)
    if spec.layout == "parallel":
        out = x + a + m
    elif spec.layout == "noskip":
        out = m
    elif spec.layout == "postnorm":
        out = norm(p, spec.res_norms[1], z + m, cfg, patch)
    else:
        out = z + m
    return MLPValues(h, d, m, out)


def block_forward(spec, p, x, cfg, layer, positions, patch=None, trace=None, index=None):
    """One block: [T, D] -> [T, D], with an optional layer patch.

    ``trace`` (optional dict) receives x, a, z, h, d, m, out (the top-level forward's trace).
    """
    at = attention_values(spec, p, x, cfg, layer, positions, patch, index)
    ml = mlp_values(spec, p, x, at.z, at.a, cfg, patch)
    if trace is not None:
        trace.update(x=x, a=at.a, z=at.z, h=ml.h, d=ml.d, m=ml.m, out=ml.out)
    return ml.out


def layer_patch(spec, p, cfg, noctx, ctx, method="auto"):
    """The block theorem for one layer (M8 specialised by the layout).

    Args:
      noctx: without-context values at the kept tokens: a mapping with x, a, z (the
        attention sublayer run on the stream the patched model has there).
      ctx: with-context values at the kept tokens: x, a, z, h (and out for parallel blocks).
      method: the outer construction, one of ``spec.outer.methods(cfg)``.
    Returns:
      (construction name, layer patch dict).
    """
    return m8(spec.inner, spec.outer, p, cfg, *theorem_inputs(spec, p, cfg, noctx, ctx), method)


def theorem_inputs(spec, p, cfg, noctx, ctx):
    """What the general theorem (M8) reads at the kept tokens, by layout: (z, z_ctx, h_ctx,
    delta), the arguments of :func:`~minipatch.controllability.m8` after the parameters.

    Sequential and post-norm layouts: the inner witness maps z to z^C, the outer one adds
    delta = z^C - z. Parallel: the MLP reads x, not the context (z_ctx None: no inner patch);
    the outer witness adds delta = out^C - (x + a + g(f(x))) at h = f(x) (= Attn^C - Attn
    when x = x^C). No-skip (M3): matching the hidden is enough (delta None).
    """
    if spec.layout == "parallel":
        x = noctx["x"]
        if "out" in ctx:
            h = spec.inner.forward(p, x, cfg)
            delta = ctx["out"] - (x + noctx["a"] + spec.outer.forward(p, h, cfg))
        else:
            h, delta = ctx["h"], ctx["a"] - noctx["a"]
        return x, None, h, delta
    if spec.layout == "noskip":
        return noctx["z"], ctx["z"], ctx["h"], None
    return noctx["z"], ctx["z"], ctx["h"], ctx["z"] - noctx["z"]


def layer_shapes(spec, cfg):
    """name -> shape of every parameter of one layer of this family: the attention
    sublayer's, then the inner and outer parts' own (:meth:`shapes`)."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    s = norm_shapes("attn_norm", D, cfg.norm) if spec.attn_pre_norm else {}
    s.update(linear_shapes("q_proj", N * H, D, cfg.attn_bias))
    s.update(linear_shapes("k_proj", K * H, D, cfg.attn_bias))
    s.update(linear_shapes("v_proj", K * H, D, cfg.attn_bias))
    s.update(linear_shapes("o_proj", D, N * H, cfg.o_bias))
    if cfg.qk_norm == "head":
        s.update(norm_shapes("q_norm", H, "rms"), **norm_shapes("k_norm", H, "rms"))
    elif cfg.qk_norm == "full":
        s.update(norm_shapes("q_norm", N * H, "rms"), **norm_shapes("k_norm", K * H, "rms"))
    if spec.attn_post_norm:
        s.update(norm_shapes("attn_post_norm", D, cfg.norm))
    if spec.layout == "postnorm":
        s.update(norm_shapes(spec.res_norms[0], D, cfg.norm), **norm_shapes(spec.res_norms[1], D, cfg.norm))
    return {**s, **spec.inner.shapes(cfg), **spec.outer.shapes(cfg)}


__all__ = ["BlockSpec", "AttnValues", "KV", "MLPValues", "project_qkv", "attention_output", "attention_parts",
           "mlp_input", "attention_values", "attend", "attention_values_many", "own_attention_values",
           "attn_sublayer", "mlp_values", "block_forward", "layer_patch", "theorem_inputs", "layer_shapes",
           "take_rows"]
