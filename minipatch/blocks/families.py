"""The declarations: one function per block family, ``cfg -> BlockSpec``.

| family        | layout     | inner (input-controllable)          | outer (output-controllable)   | HF model_type        |
|---------------|------------|-------------------------------------|-------------------------------|----------------------|
| gemma2/3      | sequential | RMSNorm(1+g) -> GeGLU               | W_down -> RMSNorm(1+g) (M6)   | gemma2, gemma3_text  |
| llama         | sequential | RMSNorm -> SwiGLU                   | W_down (M2)                   | llama, mistral, qwen2, qwen3 |
| gpt2          | sequential | LayerNorm -> W_fc, GELU             | W_proj (+bias) (M2)           | gpt2 (gpt_neox with use_parallel_residual=False) |
| olmo2         | sequential | SwiGLU (no pre-norm)                | W_down -> RMSNorm (M6)        | olmo2                |
| postnorm      | postnorm   | W_1, act (no pre-norm)              | W_2 (+bias) (M2)              | (original Transformer) |
| gptj          | parallel   | shared LayerNorm -> W_fc, GELU      | W_out (M2), delta = Attn diff | gptj, phi            |
| neox          | parallel   | own LayerNorm -> W_fc, GELU         | W_out (M2), delta = Attn diff | gpt_neox             |
| parallel      | parallel   | shared RMSNorm -> SwiGLU (PaLM)     | W_down (M2), delta = Attn diff| (PaLM)               |
| mixtral       | sequential | RMSNorm -> router + SwiGLU experts  | expert W_down (M2 / gate)     | mixtral              |
| qwen2_moe     | sequential | ... + sigmoid-gated shared expert   | expert W_down (M2 / gate)     | qwen2_moe            |
| vanilla_m3    | noskip     | W, act (Dherin et al. M3)           | none needed                   |                      |
| vanilla_m4    | sequential | W_1, act                            | b_2 += delta (M4)             |                      |

With ``cfg.mlp_depth`` > 2 (vanilla_m3, vanilla_m4, gpt2) the outer part is the rest of the MLP
(``minipatch.deep.DeepOuter``): its witness is M2 on the last layer, or the bias shift for M4.

Attention-side differences (q/k norms per head or over all heads, biases, partial or
interleaved RoPE, sliding windows, soft-capping) live in the config, not here: they change
the attention sublayer, which the theorem only reads through its outputs.
"""
from __future__ import annotations

from ..controllability import BiasOuter, GatedInner, LinearInner, LinearOuter, RMSPostNormOuter
from ..experts import MoEInner, MoEOuter
from ..deep import deep_outer
from ..errors import UnsupportedArchitectureError
from .base import BlockSpec


def gemma(cfg):
    return BlockSpec("sequential", GatedInner("mlp_norm", act=cfg.act), RMSPostNormOuter(),
                     attn_post_norm=True)


def llama(cfg):
    return BlockSpec("sequential", GatedInner("mlp_norm", act=cfg.act), LinearOuter())


def gpt2(cfg):
    return BlockSpec("sequential", LinearInner("mlp_norm", act=cfg.act), deep_outer(cfg) or LinearOuter())


def olmo2(cfg):
    return BlockSpec("sequential", GatedInner(None, act=cfg.act), RMSPostNormOuter(),
                     attn_pre_norm=False, attn_post_norm=True)


def postnorm(cfg):
    return BlockSpec("postnorm", LinearInner(None, act=cfg.act), LinearOuter(), attn_pre_norm=False)


def gptj(cfg):
    return BlockSpec("parallel", LinearInner("attn_norm", act=cfg.act), LinearOuter())


def neox(cfg):
    return BlockSpec("parallel", LinearInner("mlp_norm", act=cfg.act), LinearOuter())


def palm(cfg):
    return BlockSpec("parallel", GatedInner("attn_norm", act=cfg.act), LinearOuter())


def moe(cfg):
    return BlockSpec("sequential", MoEInner("mlp_norm", act=cfg.act), MoEOuter())


def vanilla_m3(cfg):
    return BlockSpec("noskip", LinearInner(None, act=cfg.act), deep_outer(cfg) or LinearOuter(), attn_pre_norm=False)


def vanilla_m4(cfg):
    return BlockSpec("sequential", LinearInner(None, act=cfg.act), deep_outer(cfg, prefer_bias=True) or BiasOuter(),
                     attn_pre_norm=False)


FAMILY_SPECS = {
    "gemma3": gemma, "gemma2": gemma, "llama": llama, "gpt2": gpt2, "olmo2": olmo2,
    "postnorm": postnorm, "gptj": gptj, "neox": neox, "parallel": palm,
    "mixtral": moe, "qwen2_moe": moe, "vanilla_m3": vanilla_m3, "vanilla_m4": vanilla_m4,
}


def spec_for(cfg) -> BlockSpec:
    try:
        return FAMILY_SPECS[cfg.family](cfg)
    except KeyError:
        raise UnsupportedArchitectureError(f"no block declaration for family {cfg.family!r}") from None
