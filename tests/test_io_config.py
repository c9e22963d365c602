"""Hugging Face defaults per model_type (minipatch/io/config_check.py, HF_DEFAULTS), and
configs that omit a field loading exactly like configs that spell the default out."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minipatch as mp
from minipatch.errors import ConfigError, ModelFileError
from minipatch.io.config_check import HF_DEFAULTS
from minipatch.io.hf import config_from_hf

from helpers import TOL64_BLOCK, rel_err
from filekit import FIXTURES, copy_fixture

pytestmark = pytest.mark.io

# model_type -> what an (almost) empty config must give: the transformers 5 config class defaults.
EXPECTED = {
    "llama": dict(family="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                  d_head=128, d_ff=11008, norm_eps=1e-6, act="silu", tie_embeddings=False, rope_theta=1e4,
                  attn_bias=False, mlp_bias=False, layer_types=()),
    "mistral": dict(d_ff=14336, n_kv_heads=8, d_head=128, sliding_window=4096, layer_types=("sliding",) * 32,
                    attn_bias=False, rope_theta=1e4),
    "mixtral": dict(family="mixtral", n_experts=8, top_k=2, moe_renormalize=True, norm_eps=1e-5, rope_theta=1e6,
                    n_kv_heads=8, sliding_window=None, layer_types=()),
    "qwen2": dict(vocab_size=151936, d_ff=22016, n_kv_heads=32, attn_bias=True, o_bias=False, layer_types=()),
    "qwen3": dict(d_head=128, qk_norm="head", attn_bias=False, tie_embeddings=False),
    "qwen2_moe": dict(family="qwen2_moe", d_model=2048, n_layers=24, n_heads=16, n_experts=60, top_k=4,
                      d_ff=1408, d_ff_shared=5632, moe_renormalize=False, attn_bias=True, o_bias=False),
    "olmo2": dict(family="olmo2", vocab_size=50304, norm_eps=1e-5, qk_norm="full"),
    "gemma3_text": dict(family="gemma3", vocab_size=262208, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                        d_head=256, d_ff=9216, tie_embeddings=True, query_pre_attn_scalar=256.0,
                        rope_theta=1e6, rope_local_theta=1e4, sliding_window=4096, attn_softcap=None,
                        final_softcap=None, act="gelu_tanh", norm_offset=1.0, embed_scale=True,
                        layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(26))),
    "gemma2": dict(family="gemma2", vocab_size=256000, tie_embeddings=True, query_pre_attn_scalar=256.0,
                   attn_softcap=50.0, final_softcap=30.0, rope_theta=1e4, qk_norm="none",
                   layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(26))),
    "gpt2": dict(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_head=64, d_ff=3072,
                 max_positions=1024, tie_embeddings=True, norm="layer", norm_eps=1e-5, act="gelu_tanh",
                 pos_embedding="learned"),
    "gptj": dict(family="gptj", vocab_size=50400, d_model=4096, n_layers=28, n_heads=16, d_head=256,
                 d_ff=16384, rotary_dim=64, rope_interleaved=True, tie_embeddings=False),
    "phi": dict(family="gptj", vocab_size=51200, d_model=2048, n_heads=32, d_head=64, rotary_dim=32,
                norm_eps=1e-5, act="gelu_tanh"),
    "gpt_neox": dict(family="neox", vocab_size=50432, d_model=6144, n_layers=44, n_heads=64, d_head=96,
                     rotary_dim=24, attn_bias=True, act="gelu", tie_embeddings=False),
}


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_empty_config_takes_hf_defaults(model_type):
    """{'model_type': X} alone gives the HF config class's defaults (no allocation: scalars only)."""
    cfg = config_from_hf({"model_type": model_type})
    for field, want in EXPECTED[model_type].items():
        assert getattr(cfg, field) == want, (model_type, field)


def test_every_model_type_has_expectations():
    assert set(EXPECTED) == set(HF_DEFAULTS)


# Fields whose value in a fixture equals the HF default: dropping them must change nothing.
DROPPABLE = [
    ("gemma2", ["tie_word_embeddings"]),                      # gemma ties by default
    ("gemma2", ["attn_logit_softcapping", "final_logit_softcapping"]),   # 50 / 30
    ("phi", ["rope_parameters.partial_rotary_factor"]),       # phi rotates half of each head
    ("gpt_neox", ["rope_parameters.partial_rotary_factor"]),  # neox a quarter
    ("gpt_neox", ["use_parallel_residual", "attention_bias"]),
    ("qwen2_moe", ["qkv_bias", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"]),
    ("mixtral", ["num_local_experts", "num_experts_per_tok", "rope_parameters"]),  # 8 / 2, theta 1e6
    ("qwen2", ["use_sliding_window", "sliding_window", "layer_types"]),
    ("gptj", ["activation_function"]),
]


def _drop(cfg, key):
    if "." in key:
        outer, inner = key.split(".")
        cfg[outer] = {k: v for k, v in cfg[outer].items() if k != inner}
    else:
        cfg.pop(key)


@pytest.mark.parametrize("name,keys", DROPPABLE, ids=[f"{n}-{'+'.join(k)}" for n, k in DROPPABLE])
def test_omitted_field_equals_spelled_out_default(tmp_path, name, keys):
    ref = dict(np.load(FIXTURES / name / "reference.npz", allow_pickle=False))
    folder = copy_fixture(name, tmp_path / name)
    cfg = json.loads((folder / "config.json").read_text())
    for k in keys:
        _drop(cfg, k)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert rel_err(mp.load(folder).forward(ref["input_ids"]), ref["logits"]) <= TOL64_BLOCK


def test_defaults_matter_negative_controls(tmp_path):
    """Each default above is load-bearing: the opposite value loads a different model or none."""
    ref = dict(np.load(FIXTURES / "phi" / "reference.npz", allow_pickle=False))
    folder = copy_fixture("phi", tmp_path / "phi")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = 1.0       # the pre-default behaviour
    (folder / "config.json").write_text(json.dumps(cfg))
    assert rel_err(mp.load(folder).forward(ref["input_ids"]), ref["logits"]) > 1e-3
    g = copy_fixture("gemma2", tmp_path / "gemma2")
    cfg = json.loads((g / "config.json").read_text())
    cfg["tie_word_embeddings"] = False                           # untied: the checkpoint has no head
    (g / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="lm_head.weight"):
        mp.load(g)


def test_defaulted_value_is_named_in_errors():
    with pytest.raises(ConfigError, match="'rms_norm_eps' = 'x': must be a number$") as e:   # set, not defaulted
        config_from_hf({"model_type": "gemma2", "rms_norm_eps": "x"})
    assert e.value.field == "rms_norm_eps" and e.value.value == "x"
    with pytest.raises(ConfigError) as e:   # HF default num_key_value_heads 4 does not divide 6 heads
        config_from_hf({"model_type": "gemma2", "num_attention_heads": 6})
    assert e.value.field == "num_key_value_heads" and "does not set it" in str(e.value)


def test_qwen_sliding_window_layer_rules():
    """Qwen 2 slides on layers >= max_window_layers; Qwen2-MoE on even layers < max_window_layers."""
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert config_from_hf(dict(base, model_type="qwen2")).layer_types == ("full", "full", "sliding", "sliding")
    moe = config_from_hf(dict(base, model_type="qwen2_moe", max_window_layers=3))
    assert moe.layer_types == ("sliding", "full", "sliding", "full") and moe.sliding_window == 8
    off = config_from_hf(dict(base, model_type="qwen2", use_sliding_window=False))
    assert off.layer_types == () and off.sliding_window is None
