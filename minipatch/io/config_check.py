"""Reading a Hugging Face ``config.json``: the one place where every field the loaders read is
defaulted, type-checked and range-checked, before anything is allocated (:class:`HFConfig`; the
per-``model_type`` builders that use it are in :mod:`minipatch.io.hf_builders`, the check of the
tensor index against the config in :mod:`minipatch.io.tensor_index`).

- **Defaults.** A field a config omits takes the value the Hugging Face config class of that
  ``model_type`` gives it (:data:`HF_DEFAULTS`, read from transformers 5's
  ``configuration_<model>.py``): e.g. ``gemma3_text`` ties its embeddings, ``phi`` rotates half
  of each head and ``gpt_neox`` a quarter, Gemma scales scores by ``256 ** -0.5``. An error on
  a defaulted value says so.
- **Types and ranges.** Integers are JSON integers (not booleans, not ``64.0``) within
  :data:`LIMITS`; floats are finite; ``eps`` and ``rope_theta`` are > 0; ``0 <
  partial_rotary_factor <= 1``; flags are ``true``/``false`` (``null`` reads as false, as
  Hugging Face's truthiness does); heads divide evenly; enumerations (``layer_types``, rope
  types, activations) are known names.
- **Against the checkpoint.** Given the tensor index (names, dtypes and shapes, no data), the
  layer count must equal the layers the checkpoint holds -- checked before any per-layer list
  is built, so ``num_hidden_layers: 1e12`` costs nothing -- and every tensor must be a floating
  dtype of the shape the config implies (:func:`~minipatch.io.tensor_index.check_tensor_index`).

Errors: :class:`~minipatch.errors.ConfigError` (the file, the field, the value and why) for a
value that is wrong; :class:`~minipatch.errors.UnsupportedArchitectureError` for a valid value
minipatch does not implement (rope scaling, dense layers in Qwen2-MoE, ...). Both are
:class:`~minipatch.errors.ModelFileError`.
"""
from __future__ import annotations

import math

from ..errors import ConfigError, UnsupportedArchitectureError

LIMITS = {"layers": 1 << 14, "heads": 1 << 14, "dim": 1 << 22, "vocab": 1 << 25, "experts": 1 << 14,
          "positions": 1 << 40}
"""Upper bounds on config integers (far above any published model, far below absurd)."""

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
"""Hugging Face activation name (``ACT2FN``) -> minipatch activation."""

LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
ROPE_KINDS = ("full_attention", "sliding_attention")

_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, rope_theta=10000.0)
_QWEN = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
             max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
             use_sliding_window=False, sliding_window=4096, max_window_layers=28, rope_theta=10000.0)

HF_DEFAULTS = {
    "llama": _LLAMA,
    "mistral": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096),
    "mixtral": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-5, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                    rope_theta=1e6),
    "qwen2": _QWEN,
    "qwen3": dict(_QWEN, head_dim=128, attention_bias=False),
    "qwen2_moe": dict(_QWEN, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, decoder_sparse_step=1,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      num_experts_per_tok=4, num_experts=60, norm_topk_prob=False, mlp_only_layers=[],
                      qkv_bias=True),
    "olmo2": dict(_LLAMA, vocab_size=50304, rms_norm_eps=1e-5),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6,
                        rope_local_base_freq=10000.0, attention_bias=False, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None,
                        attn_logit_softcapping=None, use_bidirectional_attention=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, rope_theta=10000.0, attention_bias=False,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, use_bidirectional_attention=False),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
    "gptj": dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                 n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                 tie_word_embeddings=False),
    "phi": dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                num_attention_heads=32, num_key_value_heads=None, hidden_act="gelu_new",
                max_position_embeddings=2048, layer_norm_eps=1e-5, tie_word_embeddings=False,
                rope_theta=10000.0, partial_rotary_factor=0.5, qk_layernorm=False),
    "gpt_neox": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                     intermediate_size=24576, hidden_act="gelu", max_position_embeddings=2048,
                     layer_norm_eps=1e-5, tie_word_embeddings=False, use_parallel_residual=True,
                     attention_bias=True, rotary_emb_base=10000.0, rotary_pct=0.25),
}
"""model_type -> the Hugging Face default of every field minipatch reads (transformers 5)."""

MISSING = object()


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class HFConfig:
    """A config.json dict being read: each accessor validates the field it returns.

    Args:
      config: the parsed JSON object.
      source: the file it came from (named in every error), or None.
      layers_found: the layer indices the checkpoint's tensor names hold, or None; when given,
        the layer count is checked against them before anything of that length is built.
    """

    def __init__(self, config, source=None, layers_found=None):
        self.source = source
        if not isinstance(config, dict):
            raise ConfigError("<top level>", type(config).__name__, "config must be a JSON object", source=source)
        mt = config.get("model_type", MISSING)
        if mt is MISSING or not isinstance(mt, str):
            raise ConfigError("model_type", None if mt is MISSING else mt,
                              "must be a string naming the architecture" + (" (missing)" if mt is MISSING else ""),
                              source=source)
        if mt not in HF_DEFAULTS:
            raise UnsupportedArchitectureError(self._where() + f"model_type {mt!r} is not supported; "
                                               f"supported: {sorted(HF_DEFAULTS)}")
        self.c, self.model_type, self.defaults = config, mt, HF_DEFAULTS[mt]
        self.layers_found = layers_found

    # -- raw access and errors ---------------------------------------------------------------
    def _where(self):
        return f"{self.source}: " if self.source else ""

    def has(self, key):
        return key in self.c

    def get(self, key, default=MISSING):
        """(value, defaulted): the config's value, else the HF default, else ``default``."""
        if key in self.c:
            return self.c[key], False
        if key in self.defaults:
            return self.defaults[key], True
        if default is not MISSING:
            return default, True
        self.fail(key, None, "is missing and has no Hugging Face default")

    def fail(self, key, value, reason, defaulted=None):
        if defaulted is None:
            defaulted = key not in self.c and key in self.defaults
        if defaulted:
            reason += " (the Hugging Face default: config.json does not set it)"
        raise ConfigError(key, value, reason, source=self.source)

    def unsupported(self, key, value, reason):
        raise UnsupportedArchitectureError(f"{self._where()}config field {key!r} = {value!r}: {reason}")

    # -- typed accessors -----------------------------------------------------------------------
    def int(self, key, limit="dim", lo=1, none_ok=False, default=MISSING):
        v, d = self.get(key, default)
        if v is None and none_ok:
            return None
        if not is_int(v):
            self.fail(key, v, "must be an integer" + (" or null" if none_ok else ""), d)
        cap = LIMITS[limit] if isinstance(limit, str) else limit
        if v < lo or (cap is not None and v > cap):
            self.fail(key, v, f"must lie in [{lo}, {cap}]" if cap is not None else f"must be >= {lo}", d)
        return v

    def real(self, key, positive=True, none_ok=False, default=MISSING):
        v, d = self.get(key, default)
        return self.check_real(key, v, d, positive, none_ok)

    def check_real(self, key, v, defaulted=False, positive=True, none_ok=False):
        if v is None and none_ok:
            return None
        if not is_real(v):
            self.fail(key, v, "must be a number" + (" or null" if none_ok else ""), defaulted)
        if not math.isfinite(v):
            self.fail(key, v, "must be finite", defaulted)
        if positive and not v > 0:
            self.fail(key, v, "must be > 0", defaulted)
        return float(v)

    def flag(self, key, default=MISSING):
        v, d = self.get(key, default)
        if v is None:
            return False
        if not isinstance(v, bool):
            self.fail(key, v, "must be true, false or null", d)
        return v

    def text(self, key, default=MISSING):
        v, d = self.get(key, default)
        if not isinstance(v, str):
            self.fail(key, v, "must be a string", d)
        return v

    def act(self, key):
        name = self.text(key)
        if name not in ACTIVATIONS:
            self.unsupported(key, name, f"activation not implemented; one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[name]

    def n_layers(self, key):
        """The layer count, checked against the checkpoint's layer indices when known."""
        n = self.int(key, "layers")
        found = self.layers_found
        if found is not None and set(found) != set(range(n)):
            have = (f"{len(found)} layers, indices {min(found)}..{max(found)}" if found else "no layer tensors")
            self.fail(key, n, f"the checkpoint holds tensors for {have}")
        return n
