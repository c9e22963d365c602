"""Hugging Face configs and checkpoints -> minipatch models.

``config_from_hf`` turns a config.json dict into a ModelConfig (one builder per model_type,
each stating the HF semantics it relies on); ``map_tensors`` applies the family's name table
from ``minipatch.io.hf_tables``; ``model_from_hf`` builds the Model.

Supported model_type: gemma3_text, gemma2, llama, mistral, qwen2, qwen3, olmo2, mixtral,
qwen2_moe, gpt2, gptj, phi, gpt_neox.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError, ShapeError, UnsupportedArchitectureError

from .hf_tables import (GEMMA, GPT2, GPTJ, IGNORED, LLAMA, MIXTRAL, OLMO2, PHI,  # noqa: F401
                        QWEN2_MOE, QWEN3, neox_table)

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
                       rope_theta=10000.0,          # hard-coded in HF's create_sinusoidal_positions
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
