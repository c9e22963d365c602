"""Hugging Face conformance of every loaded family, and the theorem on each checkpoint.

Fixtures in ``tests/fixtures/<model_type>/`` (tools/make_fixtures.py, transformers 5.23,
true float64; the spec is tests/fixtures/README.md): tiny random checkpoints with
``reference.npz`` holding the full-sequence logits and hidden states, and the kept-only
logits (HF's sequence-index sliding window, and where present the original-position window).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import minipatch
from minipatch.errors import ModelFileError, UnsupportedArchitectureError
from minipatch.io.hf import config_from_hf, model_from_hf
from minipatch.io.safetensors import read_checkpoint_folder
from helpers import CONTROL_MIN, FIXTURES, fixture, TOL32, TOL64_BLOCK, TOL64_MODEL, rel_err

pytestmark = pytest.mark.io

MARKS = {"gemma2": "gemma", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "olmo2": "olmo2",
         "gptj": "parallel", "phi": "parallel", "gpt_neox": "parallel", "mixtral": "moe", "qwen2_moe": "moe"}


def _params():
    out = []
    for name, mark in MARKS.items():
        out.append(pytest.param(name, id=name, marks=[getattr(pytest.mark, mark)]))
    return out


_CACHE = {}


def load(name):
    if name not in _CACHE:
        d = fixture(name)
        _CACHE[name] = (minipatch.load(d), dict(np.load(d / "reference.npz", allow_pickle=False)))
    return _CACHE[name]


@pytest.mark.parametrize("name", _params())
def test_logits_and_hidden_states_match_hf(name):
    model, ref = load(name)
    tr = {}
    logits = model.forward(ref["input_ids"], trace=tr)
    assert rel_err(logits, ref["logits"]) <= TOL64_BLOCK
    assert rel_err(np.stack(tr["hidden_states"]), ref["hidden_states"]) <= TOL64_BLOCK
    assert rel_err(tr["final_prenorm"], ref["hidden_final_prenorm"]) <= TOL64_BLOCK
    # negative control: the stock HF float64 run (float32 norms/RoPE/softmax) is measurably off
    assert rel_err(ref["logits_stock"], ref["logits"]) > 1e-12 or name == "gpt2"


@pytest.mark.parametrize("name", _params())
def test_kept_only_logits_in_both_window_conventions(name):
    model, ref = load(name)
    K = ref["kept_positions"]
    got = model.forward(ref["input_ids"][K], positions=K, window_by="index")
    assert rel_err(got, ref["logits_kept_only"]) <= TOL64_BLOCK
    if "logits_kept_only_poswindow" in ref:
        got = model.forward(ref["input_ids"][K], positions=K, window_by="position")
        assert rel_err(got, ref["logits_kept_only_poswindow"]) <= TOL64_BLOCK
        assert rel_err(ref["logits_kept_only"], ref["logits_kept_only_poswindow"]) > 1e-3


@pytest.mark.m7
@pytest.mark.m8
@pytest.mark.parametrize("name", _params())
def test_theorem_on_checkpoint(name):
    """Absorb the context positions; the patched kept-only run equals HF's logits[kept]."""
    model, ref = load(name)
    ids, K = ref["input_ids"], ref["kept_positions"]
    res = minipatch.absorb(model, ids, ref["context_positions"])
    np.testing.assert_array_equal(res.kept, K)
    assert rel_err(minipatch.patched_forward(model, ids, res), ref["logits"][K]) <= TOL64_MODEL
    assert rel_err(ref["logits_kept_only"], ref["logits"][K]) >= CONTROL_MIN
    m32 = model.astype(np.float32)
    r32 = minipatch.absorb(m32, ids, ref["context_positions"])
    assert rel_err(minipatch.patched_forward(m32, ids, r32), ref["logits"][K]) <= TOL32


EXPECTED = {   # model_type -> ModelConfig fields the loader must derive (HF semantics)
    "gemma2": dict(family="gemma2", qk_norm="none", norm_offset=1.0, attn_softcap=50.0, final_softcap=30.0,
                   layer_types=("sliding", "full"), sliding_window=4, embed_scale=True, query_pre_attn_scalar=32),
    "mistral": dict(family="llama", layer_types=("sliding", "sliding"), sliding_window=4, attn_bias=False),
    "qwen2": dict(family="llama", attn_bias=True, o_bias=False, layer_types=(), tie_embeddings=True),
    "qwen3": dict(family="llama", qk_norm="head", d_head=24, norm_offset=0.0, attn_bias=False),
    "olmo2": dict(family="olmo2", qk_norm="full", norm_offset=0.0),
    "gptj": dict(family="gptj", rotary_dim=8, rope_interleaved=True, act="gelu_tanh", attn_bias=False, d_ff=32),
    "phi": dict(family="gptj", rotary_dim=8, rope_interleaved=False, attn_bias=True, o_bias=True),
    "gpt_neox": dict(family="neox", rotary_dim=4, rope_interleaved=False, act="gelu", attn_bias=True),
    "mixtral": dict(family="mixtral", n_experts=8, top_k=2, moe_renormalize=True, d_ff=8, rope_theta=1e6),
    "qwen2_moe": dict(family="qwen2_moe", n_experts=8, top_k=3, moe_renormalize=False, d_ff=8,
                      d_ff_shared=16, attn_bias=True, o_bias=False),
}


@pytest.mark.parametrize("name", _params())
def test_config_semantics(name):
    cfg = config_from_hf(json.loads((FIXTURES / name / "config.json").read_text()))
    for k, v in EXPECTED[name].items():
        assert getattr(cfg, k) == v, (name, k, getattr(cfg, k), v)
    assert cfg.extra.get("head_bias", False) == (name in ("gptj", "phi"))


@pytest.mark.parallel
def test_neox_fused_qkv_is_interleaved_per_head():
    """query_key_value rows are [q_0 k_0 v_0 q_1 k_1 v_1 ...] in blocks of d_head: a plain
    thirds split (GPT-2's c_attn convention) loads but computes different logits."""
    d = FIXTURES / "gpt_neox"
    if not d.exists():
        pytest.skip("gpt_neox fixture not built")
    config, tensors = read_checkpoint_folder(d)
    ref = np.load(d / "reference.npz")
    N, H = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]
    good = model_from_hf(config, tensors)
    w = tensors["gpt_neox.layers.0.attention.query_key_value.weight"]
    q_head1 = w[3 * H: 4 * H]                         # head 1's query rows
    np.testing.assert_array_equal(good.params["layers"][0]["q_proj.weight"][H:2 * H], q_head1)
    # re-store the fused tensors as plain thirds [Q; K; V]: loading them as per-head blocks is wrong
    bad = dict(tensors)
    for i in range(config["num_hidden_layers"]):
        for kind in ("weight", "bias"):
            k = f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"
            lp = good.params["layers"][i]
            bad[k] = np.concatenate([lp[f"{p}_proj.{kind}"] for p in "qkv"])
    assert rel_err(model_from_hf(config, bad).forward(ref["input_ids"]), ref["logits"]) > 1e-2
    assert N > 1


@pytest.mark.moe
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_fused_expert_tensors_load_the_same(name):
    """transformers 5 in-memory names (mlp.gate, mlp.experts.gate_up_proj [E, 2F, D],
    mlp.experts.down_proj [E, D, F]) give the same model as the per-expert checkpoint names."""
    d = FIXTURES / name
    if not d.exists():
        pytest.skip(f"{name} fixture not built")
    config, tensors = read_checkpoint_folder(d)
    ref = np.load(d / "reference.npz")
    E = config.get("num_local_experts") or config["num_experts"]
    if name == "mixtral":
        pre, names = "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        pre, names = "mlp.", ("gate_proj", "up_proj", "down_proj")
    fused = {}
    for k, v in tensors.items():
        if ".experts." not in k and not k.endswith(pre + "gate.weight"):
            fused[k] = v
    for i in range(config["num_hidden_layers"]):
        L = f"model.layers.{i}."
        stack = [np.stack([tensors[f"{L}{pre}experts.{e}.{n}.weight"] for e in range(E)]) for n in names]
        fused[L + "mlp.experts.gate_up_proj"] = np.concatenate(stack[:2], axis=1)
        fused[L + "mlp.experts.down_proj"] = stack[2]
        fused[L + "mlp.gate.weight"] = tensors[f"{L}{pre}gate.weight"]
    got = model_from_hf(config, fused).forward(ref["input_ids"])
    assert rel_err(got, ref["logits"]) <= TOL64_BLOCK


def test_unknown_tensor_and_unsupported_configs_raise():
    d = FIXTURES / "qwen2_moe"
    if not d.exists():
        pytest.skip("qwen2_moe fixture not built")
    config, tensors = read_checkpoint_folder(d)
    with pytest.raises(ModelFileError, match="unexpected tensor"):
        model_from_hf(config, dict(tensors, **{"model.layers.0.mlp.extra.weight": np.zeros(3)}))
    with pytest.raises(UnsupportedArchitectureError):
        config_from_hf(dict(config, mlp_only_layers=[1]))
    missing = {k: v for k, v in tensors.items() if "experts.3." not in k or "layers.1." not in k}
    with pytest.raises(ModelFileError):
        model_from_hf(config, missing)
    with pytest.raises(UnsupportedArchitectureError):
        config_from_hf(dict(json.loads((FIXTURES / "phi" / "config.json").read_text()), qk_layernorm=True))
