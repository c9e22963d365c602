"""Hugging Face parameter names -> minipatch names: one readable table per family.

Each table maps a Hugging Face parameter name (``{i}`` the layer index, ``{e}`` an expert
index) to the internal name of ``minipatch.model`` / ``minipatch.blocks.base.layer_shapes``.
A value is a name, ``(name, transform)`` for tensors stored differently (GPT-2's Conv1D
weights are (in, out)), or a splitter returning several (name, array) pairs (GPT-2's fused
c_attn, GPT-NeoX's per-head fused query_key_value, transformers 5's fused expert gate_up).
Per-expert tensors map to ``experts.{e}.X`` and are stacked into ``experts.X`` [E, out, in]
by the loader (``minipatch.io.hf``). Tensors no table knows raise ModelFileError, except
the buffers listed in ``IGNORED``.
"""
from __future__ import annotations

import numpy as np

# ---- name tables -------------------------------------------------------------------------

L = "model.layers.{i}."

GEMMA = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    L + "input_layernorm.weight": "attn_norm.weight",
    L + "self_attn.q_proj.weight": "q_proj.weight",
    L + "self_attn.k_proj.weight": "k_proj.weight",
    L + "self_attn.v_proj.weight": "v_proj.weight",
    L + "self_attn.o_proj.weight": "o_proj.weight",
    L + "self_attn.q_norm.weight": "q_norm.weight",
    L + "self_attn.k_norm.weight": "k_norm.weight",
    L + "post_attention_layernorm.weight": "attn_post_norm.weight",
    L + "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    L + "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
    L + "mlp.gate_proj.weight": "gate_proj.weight",
    L + "mlp.up_proj.weight": "up_proj.weight",
    L + "mlp.down_proj.weight": "down_proj.weight",
}

LLAMA = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    L + "input_layernorm.weight": "attn_norm.weight",
    L + "post_attention_layernorm.weight": "mlp_norm.weight",   # Llama's name for the pre-FFW norm
    **{L + f"self_attn.{p}_proj.{k}": f"{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")},
    **{L + f"mlp.{p}_proj.{k}": f"{p}_proj.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")},
}


def _t(a):
    return np.ascontiguousarray(a.T)


def _split_c_attn(name_w):
    def split(a):
        kind = name_w.rsplit(".", 1)[-1]
        a = a.T if kind == "weight" else a          # Conv1D weight is (in, 3D)
        q, k, v = np.split(a, 3, axis=0)
        return [(f"{p}_proj.{kind}", np.ascontiguousarray(x)) for p, x in zip("qkv", (q, k, v))]

    return split


GPT2 = {
    "transformer.wte.weight": "embed.weight",
    "transformer.wpe.weight": "pos_embed.weight",
    "transformer.ln_f.weight": "final_norm.weight",
    "transformer.ln_f.bias": "final_norm.bias",
    "lm_head.weight": "lm_head.weight",
    **{f"transformer.h.{{i}}.ln_1.{k}": f"attn_norm.{k}" for k in ("weight", "bias")},
    **{f"transformer.h.{{i}}.ln_2.{k}": f"mlp_norm.{k}" for k in ("weight", "bias")},
    "transformer.h.{i}.attn.c_attn.weight": _split_c_attn("c_attn.weight"),
    "transformer.h.{i}.attn.c_attn.bias": _split_c_attn("c_attn.bias"),
    "transformer.h.{i}.attn.c_proj.weight": ("o_proj.weight", _t),
    "transformer.h.{i}.attn.c_proj.bias": "o_proj.bias",
    "transformer.h.{i}.mlp.c_fc.weight": ("up_proj.weight", _t),
    "transformer.h.{i}.mlp.c_fc.bias": "up_proj.bias",
    "transformer.h.{i}.mlp.c_proj.weight": ("down_proj.weight", _t),
    "transformer.h.{i}.mlp.c_proj.bias": "down_proj.bias",
}

# Llama-like checkpoints (Mistral, Qwen 2/3, OLMo 2, Mixtral, Qwen2-MoE) share the attention
# names; the q/k norms of Qwen 3 (per head) and OLMo 2 (over all heads) map to q_norm/k_norm.
ATTN = {
    **{L + f"self_attn.{p}_proj.{k}": f"{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")},
    L + "self_attn.q_norm.weight": "q_norm.weight",
    L + "self_attn.k_norm.weight": "k_norm.weight",
}

QWEN3 = {**LLAMA, **ATTN}

OLMO2 = {   # no pre-norms: post-norms on the attention and MLP outputs (M6 outer)
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    **ATTN,
    L + "post_attention_layernorm.weight": "attn_post_norm.weight",
    L + "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
    **{L + f"mlp.{p}_proj.weight": f"{p}_proj.weight" for p in ("gate", "up", "down")},
}

GPTJ = {    # one LayerNorm feeds attention and MLP (parallel block); the head has a bias
    "transformer.wte.weight": "embed.weight",
    "transformer.ln_f.weight": "final_norm.weight",
    "transformer.ln_f.bias": "final_norm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    **{f"transformer.h.{{i}}.ln_1.{k}": f"attn_norm.{k}" for k in ("weight", "bias")},
    **{f"transformer.h.{{i}}.attn.{p}_proj.weight": f"{p}_proj.weight" for p in "qkv"},
    "transformer.h.{i}.attn.out_proj.weight": "o_proj.weight",
    **{f"transformer.h.{{i}}.mlp.fc_in.{k}": f"up_proj.{k}" for k in ("weight", "bias")},
    **{f"transformer.h.{{i}}.mlp.fc_out.{k}": f"down_proj.{k}" for k in ("weight", "bias")},
}

PHI = {     # Phi-1/2: GPT-J's layout with biases everywhere and rotate_half partial rotary
    "model.embed_tokens.weight": "embed.weight",
    "model.final_layernorm.weight": "final_norm.weight",
    "model.final_layernorm.bias": "final_norm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    **{L + f"input_layernorm.{k}": f"attn_norm.{k}" for k in ("weight", "bias")},
    **{L + f"self_attn.{p}_proj.{k}": f"{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")},
    **{L + f"self_attn.dense.{k}": f"o_proj.{k}" for k in ("weight", "bias")},
    **{L + f"mlp.fc1.{k}": f"up_proj.{k}" for k in ("weight", "bias")},
    **{L + f"mlp.fc2.{k}": f"down_proj.{k}" for k in ("weight", "bias")},
}


def _split_neox_qkv(n_heads, d_head):
    """GPT-NeoX's fused query_key_value is interleaved *per head*: the output rows are
    [q_0 k_0 v_0 q_1 k_1 v_1 ...], each block d_head long (HF views it as [.., N, 3H])."""
    def split(a):
        kind = "weight" if a.ndim == 2 else "bias"
        x = a.reshape((n_heads, 3, d_head) + a.shape[1:])
        return [(f"{p}_proj.{kind}", np.ascontiguousarray(x[:, j].reshape((n_heads * d_head,) + a.shape[1:])))
                for j, p in enumerate("qkv")]

    return split


def neox_table(c):
    N = c["num_attention_heads"]
    H = c["hidden_size"] // N
    G = "gpt_neox.layers.{i}."
    return {
        "gpt_neox.embed_in.weight": "embed.weight",
        "gpt_neox.final_layer_norm.weight": "final_norm.weight",
        "gpt_neox.final_layer_norm.bias": "final_norm.bias",
        "embed_out.weight": "lm_head.weight",
        **{G + f"input_layernorm.{k}": f"attn_norm.{k}" for k in ("weight", "bias")},
        **{G + f"post_attention_layernorm.{k}": f"mlp_norm.{k}" for k in ("weight", "bias")},
        **{G + f"attention.query_key_value.{k}": _split_neox_qkv(N, H) for k in ("weight", "bias")},
        **{G + f"attention.dense.{k}": f"o_proj.{k}" for k in ("weight", "bias")},
        **{G + f"mlp.dense_h_to_4h.{k}": f"up_proj.{k}" for k in ("weight", "bias")},
        **{G + f"mlp.dense_4h_to_h.{k}": f"down_proj.{k}" for k in ("weight", "bias")},
    }


def _split_gate_up(a):
    """transformers 5 fused experts: gate_up_proj [E, 2F, D], gate rows first."""
    g, u = np.split(a, 2, axis=1)
    return [("experts.gate_proj.weight", np.ascontiguousarray(g)), ("experts.up_proj.weight", np.ascontiguousarray(u))]


# MoE: per-expert tensors ({e} is the expert index) are stacked into [E, out, in] afterwards.
MIXTRAL = {
    **{k: v for k, v in LLAMA.items() if ".mlp." not in k}, **ATTN,
    L + "block_sparse_moe.gate.weight": "router.weight",
    L + "block_sparse_moe.experts.{e}.w1.weight": "experts.{e}.gate_proj.weight",
    L + "block_sparse_moe.experts.{e}.w3.weight": "experts.{e}.up_proj.weight",
    L + "block_sparse_moe.experts.{e}.w2.weight": "experts.{e}.down_proj.weight",
    L + "mlp.gate.weight": "router.weight",                          # transformers 5 names
    L + "mlp.experts.gate_up_proj": _split_gate_up,
    L + "mlp.experts.down_proj": "experts.down_proj.weight",
}

QWEN2_MOE = {
    **{k: v for k, v in LLAMA.items() if ".mlp." not in k}, **ATTN,
    L + "mlp.gate.weight": "router.weight",
    **{L + f"mlp.experts.{{e}}.{p}_proj.weight": f"experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")},
    L + "mlp.experts.gate_up_proj": _split_gate_up,
    L + "mlp.experts.down_proj": "experts.down_proj.weight",
    **{L + f"mlp.shared_expert.{p}_proj.weight": f"shared.{p}_proj.weight" for p in ("gate", "up", "down")},
    L + "mlp.shared_expert_gate.weight": "shared_gate.weight",
}

IGNORED = (r".*\.attn\.(masked_)?bias$", r".*rotary_emb\.inv_freq$", r".*\.inv_freq$")
