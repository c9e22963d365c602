"""Model configuration: one frozen dataclass for every block family.

Field names follow nanoGPT / the Gemma code (``d_model``, ``n_heads``, ``n_kv_heads``,
``d_head``, ``d_ff``, ``n_experts``, ``top_k``). Axis letters used in every docstring:
T tokens, S key positions, D d_model, N heads, K kv heads, H d_head, F d_ff,
E experts, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from .errors import ConfigError, ShapeError


class ModelConfigError(ConfigError, ShapeError):
    """A :class:`ModelConfig` field of the wrong type or out of range (``field``, ``value``).

    A :class:`~minipatch.errors.ConfigError`; also a ShapeError, which this check raised before
    it named the field."""

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
    mlp_depth: int = 2              # linear layers in the MLP; > 2 for vanilla / GPT-2 blocks (MATH.md M8)
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
        _validate(self)

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


DEEP_FAMILIES = ("vanilla_m3", "vanilla_m4", "gpt2")
"""Families whose MLP may have any depth (``mlp_depth``; minipatch.deep)."""
NORMS = ("rms", "layer")
QK_NORMS = ("none", "head", "full")
ACTS = ("gelu_tanh", "gelu", "silu", "relu")
POS_EMBEDDINGS = ("rope", "learned", "none")
LAYER_KINDS = ("full", "sliding")


def _validate(c):
    """Every field's type and range, then the relations between fields (ModelConfigError)."""
    def fail(name, reason):
        raise ModelConfigError(name, getattr(c, name), reason, source="ModelConfig")

    def integer(name, lo=1, none_ok=False):
        v = getattr(c, name)
        if v is None and none_ok:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            fail(name, "must be an integer" + (" or None" if none_ok else ""))
        if v < lo:
            fail(name, f"must be >= {lo}")
        object.__setattr__(c, name, int(v))

    def real(name, positive=True, none_ok=False):
        v = getattr(c, name)
        if v is None and none_ok:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            fail(name, "must be a real number" + (" or None" if none_ok else ""))
        if not math.isfinite(v) or (positive and not v > 0):
            fail(name, "must be finite and > 0" if positive else "must be finite")
        object.__setattr__(c, name, float(v))

    def choice(name, allowed):
        if not isinstance(getattr(c, name), str) or getattr(c, name) not in allowed:
            fail(name, f"must be one of {allowed}")

    def flag(name):
        if not isinstance(getattr(c, name), bool):
            fail(name, "must be True or False")

    choice("family", FAMILIES)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "max_positions"):
        integer(name)
    for name in ("n_experts", "top_k", "d_ff_shared"):
        integer(name, lo=0)
    integer("mlp_depth", lo=2)
    integer("sliding_window", none_ok=True)
    integer("rotary_dim", none_ok=True)
    choice("norm", NORMS)
    choice("qk_norm", QK_NORMS)
    choice("act", ACTS)
    choice("pos_embedding", POS_EMBEDDINGS)
    real("norm_eps")
    real("norm_offset", positive=False)
    real("rope_theta")
    for name in ("rope_local_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
        real(name, none_ok=True)
    for name in ("mlp_bias", "attn_bias", "o_bias", "rope_interleaved", "embed_scale", "tie_embeddings",
                 "moe_renormalize"):
        flag(name)
    if not isinstance(c.extra, dict):
        fail("extra", "must be a dict")
    if not isinstance(c.layer_types, tuple):
        if not isinstance(c.layer_types, list):
            fail("layer_types", "must be a tuple of 'full' / 'sliding'")
        object.__setattr__(c, "layer_types", tuple(c.layer_types))

    if c.n_heads % c.n_kv_heads:
        fail("n_kv_heads", f"must divide n_heads = {c.n_heads}")
    if c.layer_types and len(c.layer_types) != c.n_layers:
        fail("layer_types", f"has {len(c.layer_types)} entries for {c.n_layers} layers")
    if any(t not in LAYER_KINDS for t in c.layer_types):
        fail("layer_types", f"entries must be one of {LAYER_KINDS}")
    if "sliding" in c.layer_types and not c.sliding_window:
        fail("sliding_window", "sliding layers need a window >= 1")
    rd = c.rotary_dim or c.d_head
    if c.pos_embedding == "rope" and (rd % 2 or rd > c.d_head):
        fail("rotary_dim", f"must be even and at most d_head = {c.d_head} (rotary dim {rd})")
    if c.mlp_depth != 2 and c.family not in DEEP_FAMILIES:
        fail("mlp_depth", f"an MLP of another depth than 2 is declared for {DEEP_FAMILIES} only")
    if c.n_experts and not 0 < c.top_k <= c.n_experts:
        fail("top_k", f"must be in 1..n_experts = {c.n_experts}")
