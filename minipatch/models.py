"""Embedded default models with random weights at realistic scale (no download).

Weights N(0,1)/sqrt(fan_in); embeddings N(0,1)/sqrt(D) (Gemma multiplies by sqrt(D));
norm scales are drawn away from their defaults (effective gain exp(0.5 z), stored as
``g - 1`` under Gemma's 1+g convention) and biases N(0, 0.2^2), so no test passes
because a scale is 1 or a bias is 0. Deterministic for a seed.
"""
from __future__ import annotations

import numpy as np

from .blocks import layer_shapes, spec_for
from .config import ModelConfig
from .model import Model, top_shapes


def random_params(cfg, seed=0, dtype=np.float64):
    """A parameter dict for ``cfg`` (numpy, ``dtype``)."""
    rng = np.random.default_rng(seed)
    spec = spec_for(cfg)

    def draw(name, shape):
        if name.endswith(".bias"):
            return 0.2 * rng.standard_normal(shape)
        if "norm" in name:  # norm multiplier: gain exp(0.5 z)
            gain = np.exp(0.5 * rng.standard_normal(shape))
            offset = cfg.norm_offset if cfg.norm == "rms" or "q_norm" in name or "k_norm" in name else 0.0
            return gain - offset if not (name.startswith(("attn_norm", "mlp_norm", "final_norm"))
                                         and cfg.norm == "layer") else gain
        if name in ("embed.weight", "pos_embed.weight"):
            return rng.standard_normal(shape) / np.sqrt(cfg.d_model)
        if name == "lm_head.weight":
            return rng.standard_normal(shape) / np.sqrt(cfg.d_model)
        return rng.standard_normal(shape) / np.sqrt(shape[-1])

    p = {k: draw(k, s).astype(dtype) for k, s in top_shapes(cfg).items()}
    p["layers"] = [{k: draw(k, s).astype(dtype) for k, s in layer_shapes(spec, cfg).items()}
                   for _ in range(cfg.n_layers)]
    return p


def gemma_config(**kw):
    """A Gemma 3-style config (sliding/global pattern every 6th layer global, q/k norms)."""
    base = dict(family="gemma3", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                d_head=16, d_ff=128, norm="rms", norm_offset=1.0, norm_eps=1e-6, qk_norm="head",
                act="gelu_tanh", sliding_window=4, query_pre_attn_scalar=32, rope_theta=1e6,
                rope_local_theta=1e4, embed_scale=True, tie_embeddings=True)
    base.update(kw)
    if "layer_types" not in kw:
        L = base["n_layers"]
        base["layer_types"] = tuple("full" if (i + 1) % 6 == 0 or i == L - 1 else "sliding" for i in range(L))
    return ModelConfig(**base)


def tiny_gemma(seed=0, dtype=np.float64, **kw):
    """The embedded default: a small Gemma 3-style model with random weights."""
    cfg = gemma_config(**kw)
    return Model(cfg, random_params(cfg, seed, dtype))


def gemma3_270m_sized(seed=0, dtype=np.float32, n_layers=18):
    """Random weights with Gemma 3 270M's shapes (d 640, d_ff 2048, 4 heads, 1 kv head,
    head dim 256, vocab 262144, 18 layers, window 512), for benchmarks."""
    cfg = gemma_config(vocab_size=262144, d_model=640, n_layers=n_layers, n_heads=4, n_kv_heads=1,
                       d_head=256, d_ff=2048, sliding_window=512, query_pre_attn_scalar=256,
                       layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(n_layers)))
    return Model(cfg, random_params(cfg, seed, dtype))


def tiny(family, seed=0, dtype=np.float64, **kw):
    """A small random model of any declared family (see ``minipatch.blocks.families``)."""
    if family == "gemma2":   # no q/k norms, soft-capping (small caps, so they bend), alternating windows
        L = kw.get("n_layers", 4)
        kw = dict(dict(qk_norm="none", attn_softcap=10.0, final_softcap=5.0, rope_local_theta=None,
                       layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(L))), **kw)
    if family in ("gemma3", "gemma2"):
        return tiny_gemma(seed, dtype, family=family, **kw)
    base = dict(family=family, vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                d_head=16, d_ff=128, norm="rms", act="silu", tie_embeddings=False)
    base.update(FAMILY_DEFAULTS.get(family, {}))
    base.update(kw)
    cfg = ModelConfig(**base)
    return Model(cfg, random_params(cfg, seed, dtype))


FAMILY_DEFAULTS = {
    "gpt2": dict(norm="layer", norm_eps=1e-5, act="gelu_tanh", attn_bias=True, o_bias=True, mlp_bias=True,
                 pos_embedding="learned", max_positions=512, tie_embeddings=True, n_kv_heads=4),
    "olmo2": dict(qk_norm="full", norm_eps=1e-5),
    "postnorm": dict(norm="layer", norm_eps=1e-5, act="gelu_tanh", attn_bias=True, o_bias=True,
                     mlp_bias=True, n_kv_heads=4),
    "gptj": dict(norm="layer", norm_eps=1e-5, act="gelu_tanh", attn_bias=False, o_bias=False,
                 mlp_bias=True, rotary_dim=8, rope_interleaved=True, n_kv_heads=4, extra={"head_bias": True}),
    "neox": dict(norm="layer", norm_eps=1e-5, act="gelu", attn_bias=True, o_bias=True,
                 mlp_bias=True, rotary_dim=4, n_kv_heads=4),
    "parallel": dict(act="silu", n_kv_heads=1),
    "mixtral": dict(n_experts=4, top_k=2, moe_renormalize=True, d_ff=64),
    "qwen2_moe": dict(n_experts=4, top_k=2, moe_renormalize=False, d_ff=64, d_ff_shared=96, attn_bias=True),
    "vanilla_m3": dict(norm="layer", act="relu", pos_embedding="rope", mlp_bias=True),
    "vanilla_m4": dict(norm="layer", act="gelu_tanh", mlp_bias=True),
}
