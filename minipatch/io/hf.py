"""Hugging Face names and configs -> minipatch parameters, one readable table per family.

Each table maps a Hugging Face parameter name (``{i}`` stands for the layer index) to the
internal name of ``minipatch.model`` / ``minipatch.blocks.base.layer_shapes``. A value is
either a name, or ``(name, transform)`` for tensors stored differently (GPT-2's Conv1D
weights are (in, out)), or a splitter returning several (name, array) pairs (GPT-2's fused
c_attn). Tensors a table does not know raise ModelFileError, except buffers listed in
``IGNORED``.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError, ShapeError, UnsupportedArchitectureError

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

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}

# ---- configs -----------------------------------------------------------------------------


def _act(name):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedArchitectureError(f"unsupported activation {name!r}") from None


def _rope(c, kind):
    """rope_theta for 'full_attention' or 'sliding_attention' layers from either config style."""
    rp = c.get("rope_parameters") or {}
    if kind in rp:
        return float(rp[kind]["rope_theta"])
    if "rope_theta" in rp:
        return float(rp["rope_theta"])
    if kind == "sliding_attention" and c.get("rope_local_base_freq"):
        return float(c["rope_local_base_freq"])
    return float(c.get("rope_theta", 10000.0))


def _layer_types(c, default_pattern):
    n = c["num_hidden_layers"]
    lt = c.get("layer_types")
    if lt is None:
        pat = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", default_pattern))
        lt = ["full_attention" if (i + 1) % pat == 0 else "sliding_attention" for i in range(n)]
    return tuple("sliding" if t == "sliding_attention" else "full" for t in lt)


def _common(c):
    return dict(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                n_heads=c["num_attention_heads"],
                n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                d_head=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                d_ff=c["intermediate_size"], tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def gemma3_config(c):
    return ModelConfig(family="gemma3", **_common(c), norm="rms", norm_offset=1.0,
                       norm_eps=c.get("rms_norm_eps", 1e-6), qk_norm="head",
                       act=_act(c.get("hidden_activation", "gelu_pytorch_tanh")),
                       layer_types=_layer_types(c, 6), sliding_window=c.get("sliding_window"),
                       query_pre_attn_scalar=c.get("query_pre_attn_scalar"),
                       attn_softcap=c.get("attn_logit_softcapping"),
                       final_softcap=c.get("final_logit_softcapping"),
                       rope_theta=_rope(c, "full_attention"), rope_local_theta=_rope(c, "sliding_attention"),
                       embed_scale=True, attn_bias=bool(c.get("attention_bias", False)),
                       o_bias=bool(c.get("attention_bias", False)))


def _attention_layers(c, all_sliding=False):
    """(layer_types, sliding_window): HF's ``layer_types`` when given; Mistral and Mixtral
    apply ``sliding_window`` to every layer; Qwen 2 only with ``use_sliding_window``."""
    w = c.get("sliding_window") or None
    if c.get("use_sliding_window") is False:
        w = None
    if c.get("layer_types"):
        lt = tuple("sliding" if t == "sliding_attention" else "full" for t in c["layer_types"])
    else:
        lt = ("sliding",) * c["num_hidden_layers"] if (all_sliding and w) else ()
    if "sliding" not in lt:
        return (), None
    if not w:
        raise ModelFileError("config.json has sliding layers but no sliding_window")
    return lt, int(w)


def llama_config(c, family="llama", all_sliding=False, **kw):
    """Llama, Mistral, Qwen 2/3, OLMo 2, Mixtral, Qwen2-MoE: RMSNorm (weight-style), SwiGLU."""
    lt, w = _attention_layers(c, all_sliding)
    bias = bool(c.get("attention_bias", False))
    base = dict(family=family, **_common(c), norm="rms", norm_eps=c.get("rms_norm_eps", 1e-6),
                act=_act(c.get("hidden_act", "silu")), rope_theta=_rope(c, "full_attention"),
                attn_bias=bias, o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)),
                layer_types=lt, sliding_window=w)
    base.update(kw)
    return ModelConfig(**base)


def mistral_config(c):
    return llama_config(c, all_sliding=True)


def qwen2_config(c):     # q/k/v biases, none on o_proj (hard-coded in Qwen2Attention)
    return llama_config(c, attn_bias=True, o_bias=False)


def qwen3_config(c):     # per-head RMSNorm (weight-style) on q and k before RoPE
    return llama_config(c, qk_norm="head")


def olmo2_config(c):     # RMSNorm over all heads' q (N*H) and k (K*H); post-norm block
    return llama_config(c, family="olmo2", qk_norm="full")


def mixtral_config(c):   # softmax over all experts, top-k, renormalised
    return llama_config(c, family="mixtral", all_sliding=True, n_experts=c["num_local_experts"],
                        top_k=c["num_experts_per_tok"], moe_renormalize=True)


def qwen2_moe_config(c):
    if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedArchitectureError("Qwen2-MoE with dense layers (mlp_only_layers, decoder_sparse_step)")
    return llama_config(c, family="qwen2_moe", attn_bias=bool(c.get("qkv_bias", True)), o_bias=False,
                        n_experts=c["num_experts"], top_k=c["num_experts_per_tok"],
                        d_ff=c["moe_intermediate_size"], moe_renormalize=bool(c.get("norm_topk_prob", False)),
                        d_ff_shared=c.get("shared_expert_intermediate_size") or 0)


def gemma2_config(c):    # Gemma 3 without q/k norms, with attention and final soft-capping
    return gemma3_config(c).replace(family="gemma2", qk_norm="none", layer_types=_layer_types(c, 2),
                                    rope_local_theta=None)


def _rotary_dim(c, d_head):
    rp = c.get("rope_parameters") or {}
    f = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", 1.0)))
    return int(d_head * f)


def gpt2_config(c):
    D = c["n_embd"]
    return ModelConfig(family="gpt2", vocab_size=c["vocab_size"], d_model=D, n_layers=c["n_layer"],
                       n_heads=c["n_head"], n_kv_heads=c["n_head"], d_head=D // c["n_head"],
                       d_ff=c.get("n_inner") or 4 * D, norm="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       act=_act(c.get("activation_function", "gelu_new")), attn_bias=True, o_bias=True,
                       mlp_bias=True, pos_embedding="learned", max_positions=c["n_positions"],
                       tie_embeddings=bool(c.get("tie_word_embeddings", True)))


def gptj_config(c):
    D, N = c["n_embd"], c["n_head"]
    return ModelConfig(family="gptj", vocab_size=c["vocab_size"], d_model=D, n_layers=c["n_layer"],
                       n_heads=N, n_kv_heads=N, d_head=D // N, d_ff=c.get("n_inner") or 4 * D,
                       norm="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       act=_act(c.get("activation_function", "gelu_new")), mlp_bias=True,
                       rotary_dim=c.get("rotary_dim") or D // N, rope_interleaved=True,
                       rope_theta=float(c.get("rope_theta", 10000.0)),
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)), extra={"head_bias": True})


def phi_config(c):
    if c.get("qk_layernorm"):
        raise UnsupportedArchitectureError("Phi with qk_layernorm (LayerNorm on q/k) is not implemented")
    k = _common(c)
    return ModelConfig(family="gptj", **k, norm="layer", norm_eps=c.get("layer_norm_eps", 1e-5),
                       act=_act(c.get("hidden_act", "gelu_new")), attn_bias=True, o_bias=True, mlp_bias=True,
                       rotary_dim=_rotary_dim(c, k["d_head"]), rope_theta=_rope(c, "full_attention"),
                       extra={"head_bias": True})


def neox_config(c):
    """GPT-NeoX: own LayerNorm per branch; parallel residual (or sequential, as GPT-2 with RoPE)."""
    k = _common(c)
    k["d_head"] = c["hidden_size"] // c["num_attention_heads"]
    bias = bool(c.get("attention_bias", True))
    return ModelConfig(family="neox" if c.get("use_parallel_residual", True) else "gpt2", **k, norm="layer",
                       norm_eps=c.get("layer_norm_eps", 1e-5), act=_act(c.get("hidden_act", "gelu")),
                       attn_bias=bias, o_bias=bias, mlp_bias=True, rotary_dim=_rotary_dim(c, k["d_head"]),
                       rope_theta=_rope(c, "full_attention"))


# model_type -> (config builder, name table or table builder from the config dict)
FAMILIES = {
    "gemma3_text": (gemma3_config, GEMMA),
    "gemma2": (gemma2_config, GEMMA),
    "llama": (llama_config, LLAMA),
    "mistral": (mistral_config, LLAMA),
    "qwen2": (qwen2_config, LLAMA),
    "qwen3": (qwen3_config, QWEN3),
    "olmo2": (olmo2_config, OLMO2),
    "mixtral": (mixtral_config, MIXTRAL),
    "qwen2_moe": (qwen2_moe_config, QWEN2_MOE),
    "gpt2": (gpt2_config, GPT2),
    "gptj": (gptj_config, GPTJ),
    "phi": (phi_config, PHI),
    "gpt_neox": (neox_config, neox_table),
}

# ---- mapping -----------------------------------------------------------------------------


def _compile(table):
    out = []
    for pat, target in table.items():
        rx = re.escape(pat).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        out.append((re.compile("^" + rx + "$"), "{i}" in pat, target))
    return out


def map_tensors(tensors, table, n_layers):
    """Apply a name table: HF tensors -> (top-level dict, list of per-layer dicts)."""
    top, layers = {}, [dict() for _ in range(n_layers)]
    rules = _compile(table)
    ignored = [re.compile(p) for p in IGNORED]
    for name, arr in tensors.items():
        for rx, per_layer, target in rules:
            mt = rx.match(name)
            if mt:
                break
        else:
            if any(r.match(name) for r in ignored):
                continue
            raise ModelFileError(f"unexpected tensor {name!r} in checkpoint")
        if per_layer:
            i = int(mt.group("i"))
            if i >= n_layers:
                raise ModelFileError(f"tensor {name!r} names layer {i}, the config has {n_layers}")
            dest = layers[i]
        else:
            dest = top
        if isinstance(target, str):
            pairs = [(target.replace("{e}", mt.group("e")) if "{e}" in target else target, arr)]
        elif isinstance(target, tuple):
            pairs = [(target[0], target[1](arr))]
        else:
            try:
                pairs = target(arr)
            except ValueError as e:
                raise ModelFileError(f"cannot split {name!r} of shape {arr.shape}: {e}") from None
        for k, a in pairs:
            if k in dest:
                raise ModelFileError(f"two tensors map to {k!r}")
            dest[k] = a
    return top, [_stack_experts(lp) for lp in layers]


_EXPERT = re.compile(r"^experts\.(\d+)\.(.+)$")


def _stack_experts(lp):
    """Per-expert tensors 'experts.{e}.X' -> one stacked 'experts.X' [E, out, in]."""
    found = {}
    for k in [k for k in lp if _EXPERT.match(k)]:
        e, rest = _EXPERT.match(k).groups()
        found.setdefault("experts." + rest, {})[int(e)] = lp.pop(k)
    for name, per in found.items():
        if sorted(per) != list(range(len(per))):
            raise ModelFileError(f"experts of {name!r} are not numbered 0..E-1: {sorted(per)}")
        if name in lp:
            raise ModelFileError(f"two tensors map to {name!r}")
        lp[name] = np.stack([per[e] for e in range(len(per))])
    return lp


def config_from_hf(config):
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type {mt!r} is not supported; supported: {sorted(FAMILIES)}")
    try:
        return FAMILIES[mt][0](config)
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"config.json for {mt!r} lacks or mistypes a field: {e}") from None
    except ShapeError as e:
        raise ModelFileError(f"config.json for {mt!r} is inconsistent: {e}") from None


def model_from_hf(config, tensors, dtype="float64"):
    """A Model from an HF config dict and HF-named tensors (numpy)."""
    from ..backend import to
    from ..model import Model

    from ..backend import as_float_dtype

    as_float_dtype(np, dtype)
    cfg = config_from_hf(config)
    table = FAMILIES[config["model_type"]][1]
    top, layers = map_tensors(tensors, table(config) if callable(table) else table, cfg.n_layers)
    if cfg.tie_embeddings:
        top.pop("lm_head.weight", None)
    params = dict(top, layers=layers)
    try:
        return Model(cfg, to(params, dtype=dtype))
    except ShapeError as e:
        raise ModelFileError(f"checkpoint does not match its config: {e}") from None
