"""Model configuration: one frozen dataclass for every block family.

Field names follow nanoGPT / the Gemma code (``d_model``, ``n_heads``, ``n_kv_heads``,
``d_head``, ``d_ff``, ``n_experts``, ``top_k``). Axis letters used in every docstring:
T tokens, S key positions, D d_model, N heads, K kv heads, H d_head, F d_ff,
E experts, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ShapeError

FAMILIES = (
    "gemma3", "gemma2", "llama", "gpt2", "olmo2", "postnorm", "gptj", "neox", "parallel",
    "mixtral", "qwen2_moe", "vanilla_m3", "vanilla_m4",
)


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only model; ``family`` picks the block declaration."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_ff: int
    # norms
    norm: str = "rms"               # 'rms' | 'layer'
    norm_eps: float = 1e-6
    norm_offset: float = 0.0        # Gemma stores w and multiplies by (1 + w): offset 1.0
    qk_norm: str = "none"           # 'none' | 'head' (over H) | 'full' (over N*H, OLMo 2)
    # MLP
    act: str = "gelu_tanh"          # 'gelu_tanh' | 'gelu' | 'silu' | 'relu'
    mlp_bias: bool = False
    # attention
    attn_bias: bool = False         # q/k/v biases
    o_bias: bool = False
    layer_types: tuple = ()         # per layer 'full' | 'sliding'; empty means all full
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None   # score scale is this ** -0.5 (default d_head)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # positions
    pos_embedding: str = "rope"     # 'rope' | 'learned' | 'none'
    rope_theta: float = 10000.0     # global / full-attention layers
    rope_local_theta: float | None = None  # sliding layers (Gemma 3); None: rope_theta
    rotary_dim: int | None = None   # partial rotary (GPT-J, NeoX); None: d_head
    rope_interleaved: bool = False  # GPT-J pairs (2i, 2i+1); else rotate_half (NeoX/Llama/Gemma)
    max_positions: int = 1 << 20
    # embedding and head
    embed_scale: bool = False       # multiply embeddings by sqrt(d_model) (Gemma)
    tie_embeddings: bool = True
    # mixture of experts
    n_experts: int = 0
    top_k: int = 0
    moe_renormalize: bool = True    # Mixtral renormalises the top-k gates; Qwen2-MoE does not
    d_ff_shared: int = 0            # Qwen2-MoE shared expert width (0: none)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ShapeError(f"unknown family {self.family!r}; one of {FAMILIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff"):
            if int(getattr(self, name)) <= 0:
                raise ShapeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ShapeError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ShapeError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if any(t not in ("full", "sliding") for t in self.layer_types):
            raise ShapeError(f"layer_types entries must be 'full' or 'sliding': {self.layer_types}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ShapeError("sliding layers need sliding_window")
        rd = self.rotary_dim or self.d_head
        if self.pos_embedding == "rope" and (rd % 2 or rd > self.d_head):
            raise ShapeError(f"rotary_dim {rd} must be even and at most d_head {self.d_head}")
        if self.n_experts and not 0 < self.top_k <= self.n_experts:
            raise ShapeError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "full"

    def window(self, layer: int):
        return self.sliding_window if self.layer_type(layer) == "sliding" else None

    def rope_base(self, layer: int) -> float:
        if self.layer_type(layer) == "sliding" and self.rope_local_theta:
            return self.rope_local_theta
        return self.rope_theta

    @property
    def score_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.d_head) ** -0.5

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
