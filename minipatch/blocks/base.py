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

from ..backend import namespace
from ..controllability import m8, take_rows
from ..ops import apply_rope, attention, causal_mask, rope_angles
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
    xp = namespace(o)
    a = linear(p, "o_proj", xp.reshape(o, (o.shape[0], o.shape[1] * o.shape[2])), patch)
    return norm(p, "attn_post_norm", a, cfg, patch) if spec.attn_post_norm else a


def mlp_input(spec, p, x, a, cfg, patch=None):
    """The MLP input z from the layer input x and the attention output a, by layout."""
    if spec.layout == "parallel":
        return x
    if spec.layout == "noskip":
        return a
    if spec.layout == "postnorm":
        return norm(p, spec.res_norms[0], x + a, cfg, patch)
    return x + a


def attn_sublayer(spec, p, x, cfg, layer, positions, patch=None, trace=None, index=None):
    """From the layer input x [T, D] to the MLP input z and the attention output a.

    Args:
      positions: int [T] (RoPE and causality).
      index: int [T] sequence indices; when given, the sliding window is measured on them
        (Hugging Face's convention) instead of on positions.
    """
    q, k, v = project_qkv(p, norm(p, "attn_norm", x, cfg) if spec.attn_pre_norm else x,
                          cfg, layer, positions, patch)
    mask = causal_mask(positions, positions, cfg.window(layer), index, index)
    o = attention(q, k, v, mask, cfg.score_scale, cfg.attn_softcap)
    a = attention_output(spec, p, o, cfg, patch)
    z = mlp_input(spec, p, x, a, cfg, patch)
    if trace is not None:
        trace.update(x=x, a=a, z=z)
    return z, a


def block_forward(spec, p, x, cfg, layer, positions, patch=None, trace=None, index=None):
    """One block: [T, D] -> [T, D], with an optional layer patch."""
    z, a = attn_sublayer(spec, p, x, cfg, layer, positions, patch, trace, index)
    h = spec.inner.forward(p, z, cfg, patch)
    m = spec.outer.forward(p, h, cfg, patch)
    if spec.layout == "parallel":
        out = x + a + m
    elif spec.layout == "noskip":
        out = m
    elif spec.layout == "postnorm":
        out = norm(p, spec.res_norms[1], z + m, cfg, patch)
    else:
        out = z + m
    if trace is not None:
        trace.update(h=h, m=m, out=out)
    return out


def layer_patch(spec, p, cfg, tr, tr_ctx, method="auto"):
    """The block theorem for one layer (M8 specialised by the layout).

    Args:
      tr: trace of the attention sublayer without context (x, a, z) at the kept tokens.
      tr_ctx: trace of the with-context block at the kept tokens (x, a, z, h).
    Returns:
      (construction name, layer patch dict).
    """
    if spec.layout == "parallel":   # the MLP input does not see the context
        return m8(spec.inner, spec.outer, p, cfg, tr["z"], None, tr_ctx["h"], tr_ctx["a"] - tr["a"], method)
    if spec.layout == "noskip":     # no residual: matching the hidden is enough (M3)
        return m8(spec.inner, spec.outer, p, cfg, tr["z"], tr_ctx["z"], tr_ctx["h"], None, method)
    return m8(spec.inner, spec.outer, p, cfg, tr["z"], tr_ctx["z"], tr_ctx["h"],
              tr_ctx["z"] - tr["z"], method)


def layer_shapes(spec, cfg):
    """name -> shape of every parameter of one layer of this family."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_ff
    shapes = {}

    def add_norm(name, dim=D, kind=None):
        shapes[name + ".weight"] = (dim,)
        if (kind or cfg.norm) == "layer":
            shapes[name + ".bias"] = (dim,)

    def add_linear(name, out, inp, bias):
        shapes[name + ".weight"] = (out, inp)
        if bias:
            shapes[name + ".bias"] = (out,)

    if spec.attn_pre_norm:
        add_norm("attn_norm")
    add_linear("q_proj", N * H, D, cfg.attn_bias)
    add_linear("k_proj", K * H, D, cfg.attn_bias)
    add_linear("v_proj", K * H, D, cfg.attn_bias)
    add_linear("o_proj", D, N * H, cfg.o_bias)
    if cfg.qk_norm == "head":
        add_norm("q_norm", H, "rms"), add_norm("k_norm", H, "rms")
    elif cfg.qk_norm == "full":
        add_norm("q_norm", N * H, "rms"), add_norm("k_norm", K * H, "rms")
    if spec.attn_post_norm:
        add_norm("attn_post_norm")
    if spec.layout == "postnorm":
        add_norm(spec.res_norms[0]), add_norm(spec.res_norms[1])
    inner, outer = spec.inner, spec.outer
    if getattr(inner, "pre_norm", None) and inner.pre_norm != "attn_norm":
        add_norm(inner.pre_norm)
    kind = type(inner).__name__
    if kind == "MoEInner":
        E = cfg.n_experts
        shapes["router.weight"] = (E, D)
        shapes["experts.gate_proj.weight"] = (E, F, D)
        shapes["experts.up_proj.weight"] = (E, F, D)
        shapes["experts.down_proj.weight"] = (E, D, F)
        if cfg.d_ff_shared:
            Fs = cfg.d_ff_shared
            add_linear("shared.gate_proj", Fs, D, False), add_linear("shared.up_proj", Fs, D, False)
            add_linear("shared.down_proj", D, Fs, False), add_linear("shared_gate", 1, D, False)
        return shapes
    if kind == "GatedInner":
        add_linear(inner.gate, F, D, cfg.mlp_bias)
        add_linear(inner.up, F, D, cfg.mlp_bias)
    else:
        add_linear(inner.fc, F, D, cfg.mlp_bias)
    add_linear(outer.down, D, F, cfg.mlp_bias or type(outer).__name__ == "BiasOuter")
    if type(outer).__name__ == "RMSPostNormOuter":
        add_norm(outer.norm, kind="rms")
    return shapes


__all__ = ["BlockSpec", "project_qkv", "attention_output", "mlp_input", "attn_sublayer", "block_forward", "layer_patch",
           "layer_shapes", "take_rows"]
