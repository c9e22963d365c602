"""Hugging Face ``config.json`` -> :class:`~minipatch.config.ModelConfig`, one builder per
``model_type``: each reads the fields its Hugging Face model reads, through the validating
accessors of :class:`~minipatch.io.config_check.HFConfig` (defaults, types, ranges), and says
what the architecture hard-codes (biases, norm placement, rotary fraction).
"""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import MinipatchError, ModelFileError
from .config_check import HF_DEFAULTS, LAYER_TYPES, MISSING, ROPE_KINDS, HFConfig, is_int


# ---- pieces shared by the builders ----------------------------------------------------------

def _heads(r, d_model_key="hidden_size", heads_key="num_attention_heads", kv_key="num_key_value_heads",
           head_dim_key="head_dim"):
    D = r.int(d_model_key)
    N = r.int(heads_key, "heads")
    K = r.int(kv_key, "heads", none_ok=True, default=None) if kv_key else None
    K = N if K is None else K
    if N % K:
        r.fail(kv_key, K, f"must divide {heads_key} = {N}")
    H = r.int(head_dim_key, none_ok=True, default=None) if head_dim_key else None
    if H is None:
        if D % N:
            r.fail(heads_key, N, f"must divide {d_model_key} = {D}"
                   + (f" ({head_dim_key} is not given)" if head_dim_key else ""))
        H = D // N
    return D, N, K, H


def _common(r):
    D, N, K, H = _heads(r)
    return dict(vocab_size=r.int("vocab_size", "vocab"), d_model=D, n_layers=r.n_layers("num_hidden_layers"),
                n_heads=N, n_kv_heads=K, d_head=H, d_ff=r.int("intermediate_size"),
                tie_embeddings=r.flag("tie_word_embeddings"))


def _even_head(r, H):
    """Full-width RoPE rotates pairs: head_dim must be even."""
    if H % 2:
        v, d = r.get("head_dim", None)
        r.fail("head_dim" if v is not None else "num_attention_heads", v if v is not None else r.get(
            "num_attention_heads")[0], f"gives head dimension {H}; RoPE needs an even one", d)


def _rope_type(r, key, params):
    kind = params.get("rope_type", params.get("type", "default"))
    if not isinstance(kind, str):
        r.fail(key + ".rope_type", kind, "must be a string")
    if kind != "default":
        r.unsupported(key + ".rope_type", kind, "only the default (unscaled) RoPE is implemented")


def _rope(r, kinds=("full_attention",), partial_ok=False):
    """({layer kind: theta}, partial_rotary_factor) from ``rope_parameters`` (flat or per layer
    kind, transformers 5) or the legacy top-level ``rope_theta`` / ``rope_scaling`` /
    ``partial_rotary_factor``; defaults from :data:`HF_DEFAULTS`."""
    rp, _ = r.get("rope_parameters", None)
    if rp is not None and not isinstance(rp, dict):
        r.fail("rope_parameters", rp, "must be an object such as {'rope_type': 'default', 'rope_theta': 10000.0} "
               "or one such object per layer kind under 'full_attention' / 'sliding_attention'")
    rp = rp or {}
    legacy, _ = r.get("rope_scaling", None)
    if legacy is not None:
        if not isinstance(legacy, dict):
            r.fail("rope_scaling", legacy, "must be an object or null")
        _rope_type(r, "rope_scaling", legacy)
    nested = [k for k in rp if k in ROPE_KINDS]
    if nested and len(nested) != len(rp):
        r.fail("rope_parameters", rp, "mixes per-layer-kind entries with flat RoPE keys")
    thetas, factors = {}, set()
    for kind in kinds:
        key = f"rope_parameters.{kind}" if nested else "rope_parameters"
        params = rp.get(kind, MISSING) if nested else rp
        if params is MISSING:
            r.fail(key, None, "is missing: the config has per-layer-kind RoPE parameters")
        if not isinstance(params, dict):
            r.fail(key, params, "must be an object")
        _rope_type(r, key, params)
        if "rope_theta" in params:
            theta = r.check_real(key + ".rope_theta", params["rope_theta"])
        elif kind == "sliding_attention" and r.model_type == "gemma3_text":
            theta = r.real("rope_local_base_freq")
        elif r.model_type == "gpt_neox" and "rope_theta" not in r.c:
            theta = r.real("rotary_emb_base")
        else:
            theta = r.real("rope_theta")
        thetas[kind] = theta
        if "partial_rotary_factor" in params:
            f, fkey, d = params["partial_rotary_factor"], key + ".partial_rotary_factor", False
        elif r.model_type == "gpt_neox" and "partial_rotary_factor" not in r.c:
            (f, d), fkey = r.get("rotary_pct"), "rotary_pct"
        else:
            (f, d), fkey = r.get("partial_rotary_factor", 1.0), "partial_rotary_factor"
        f = r.check_real(fkey, f, d)
        if not 0 < f <= 1:
            r.fail(fkey, f, "must satisfy 0 < partial_rotary_factor <= 1", d)
        if f != 1 and not partial_ok:
            r.unsupported(fkey, f, f"partial rotary embeddings are not part of {r.model_type!r} in Hugging Face")
        factors.add((f, fkey))
    if len({f for f, _ in factors}) > 1:
        r.unsupported("rope_parameters", rp, "different partial_rotary_factor per layer kind")
    f, fkey = factors.pop()
    return thetas, (f, fkey)


def _rotary_dim(r, d_head, factor):
    f, key = factor
    rd = int(d_head * f)
    if rd < 2 or rd % 2:
        r.fail(key, f, f"gives {rd} rotary dimensions of head_dim {d_head}; need an even number >= 2")
    return rd


def _layer_types_list(r, n):
    lt, d = r.get("layer_types", None)
    if lt is None:
        return None
    if not isinstance(lt, list):
        r.fail("layer_types", lt, "must be a list of 'full_attention' / 'sliding_attention'", d)
    if len(lt) != n:
        r.fail("layer_types", f"<{len(lt)} entries>", f"needs one entry per layer ({n})")
    for i, t in enumerate(lt):
        if not isinstance(t, str) or t not in LAYER_TYPES:
            r.fail(f"layer_types[{i}]", t, f"must be one of {sorted(LAYER_TYPES)}")
    return tuple(LAYER_TYPES[t] for t in lt)


def _window(r, key="sliding_window"):
    """sliding_window as int >= 1, or None for null / 0 (Qwen2-MoE stores 0 when it is off)."""
    w = r.int(key, None, lo=0, none_ok=True, default=None)
    return w or None


def _need_window(r, lt, w):
    if "sliding" in lt and not w:
        v, d = r.get("sliding_window", None)
        r.fail("sliding_window", v, "the config has sliding-attention layers, which need a window >= 1", d)


def _finish(r, kw):
    """The ModelConfig; its own checks are a backstop (the fields were checked above)."""
    try:
        return ModelConfig(**kw)
    except MinipatchError as e:
        raise ModelFileError(f"{r._where()}config.json for {r.model_type!r} is inconsistent: {e}") from None


# ---- builders, one per model_type -----------------------------------------------------------


def _gemma(r, family):
    """Gemma 2 / 3: Gemma RMSNorm ``x̂·(1+w)``, GeGLU, sqrt(D) embedding scale, tied head by
    default, scores scaled by ``query_pre_attn_scalar ** -0.5`` (default 256)."""
    k = _common(r)
    _even_head(r, k["d_head"])
    n = k["n_layers"]
    lt = _layer_types_list(r, n)
    if lt is None:
        if family == "gemma3":
            pat = r.int("_sliding_window_pattern", "layers") if r.has("_sliding_window_pattern") \
                else r.int("sliding_window_pattern", "layers")
        else:
            pat = 2      # Gemma 2: layer i slides iff i is even
        lt = tuple("full" if (i + 1) % pat == 0 else "sliding" for i in range(n))
    w = _window(r)
    _need_window(r, lt, w)
    if r.flag("use_bidirectional_attention"):
        r.unsupported("use_bidirectional_attention", True, "only causal attention is implemented")
    thetas, factor = _rope(r, ROPE_KINDS if family == "gemma3" else ("full_attention",))
    bias = r.flag("attention_bias")
    return _finish(r, dict(
        family=family, **k, norm="rms", norm_offset=1.0, norm_eps=r.real("rms_norm_eps"),
        qk_norm="head" if family == "gemma3" else "none", act=r.act("hidden_activation"),
        layer_types=lt, sliding_window=w if "sliding" in lt else None,
        query_pre_attn_scalar=r.real("query_pre_attn_scalar"),
        attn_softcap=r.real("attn_logit_softcapping", none_ok=True),
        final_softcap=r.real("final_logit_softcapping", none_ok=True),
        rope_theta=thetas["full_attention"],
        rope_local_theta=thetas.get("sliding_attention"), embed_scale=True, attn_bias=bias, o_bias=bias))


def gemma3_config(r):
    return _gemma(r, "gemma3")


def gemma2_config(r):
    return _gemma(r, "gemma2")


def _llama_like(r, family="llama", *, attn_bias, o_bias, mlp_bias=False, qk_norm="none", moe=None):
    """Llama, Mistral, Qwen 2/3, OLMo 2, Mixtral, Qwen2-MoE: RMSNorm (weight-style), SwiGLU.

    Sliding windows: ``layer_types`` when given; else Mistral and Mixtral slide on every layer
    when ``sliding_window`` is set; Qwen 2/3 slide on layers ``i >= max_window_layers`` when
    ``use_sliding_window``; Qwen2-MoE on even ``i < max_window_layers`` when
    ``use_sliding_window`` (each model's HF ``__post_init__``)."""
    k = _common(r)
    _even_head(r, k["d_head"])
    n = k["n_layers"]
    mt = r.model_type
    w = _window(r)
    if mt in ("qwen2", "qwen3", "qwen2_moe") and not r.flag("use_sliding_window"):
        w = None
    lt = _layer_types_list(r, n)
    if lt is None:
        if mt in ("mistral", "mixtral"):
            lt = ("sliding",) * n if w else ()
        elif mt in ("qwen2", "qwen3") and w:
            m = r.int("max_window_layers", "layers", lo=0)
            lt = tuple("sliding" if i >= m else "full" for i in range(n))
        elif mt == "qwen2_moe" and w:
            m = r.int("max_window_layers", "layers", lo=0)
            lt = tuple("sliding" if (i + 1) % 2 and i < m else "full" for i in range(n))
        else:
            lt = ()
    if "sliding" not in lt:
        lt, w = (), None
    _need_window(r, lt, w)
    thetas, _ = _rope(r)
    kw = dict(family=family, **k, norm="rms", norm_eps=r.real("rms_norm_eps"), act=r.act("hidden_act"),
              rope_theta=thetas["full_attention"], attn_bias=attn_bias, o_bias=o_bias, mlp_bias=mlp_bias,
              qk_norm=qk_norm, layer_types=lt, sliding_window=w)
    if moe:
        kw.update(moe(r, kw))
    return _finish(r, kw)


def llama_config(r):
    bias = r.flag("attention_bias")
    return _llama_like(r, attn_bias=bias, o_bias=bias, mlp_bias=r.flag("mlp_bias"))


def mistral_config(r):      # no biases (hard-coded in MistralAttention / MistralMLP)
    return _llama_like(r, attn_bias=False, o_bias=False)


def qwen2_config(r):        # q/k/v biases, none on o_proj (hard-coded in Qwen2Attention)
    return _llama_like(r, attn_bias=True, o_bias=False)


def qwen3_config(r):        # per-head RMSNorm (weight-style) on q and k before RoPE
    bias = r.flag("attention_bias")
    return _llama_like(r, attn_bias=bias, o_bias=bias, qk_norm="head")


def olmo2_config(r):        # RMSNorm over all heads' q (N*H) and k (K*H); post-norm block
    bias = r.flag("attention_bias")
    return _llama_like(r, "olmo2", attn_bias=bias, o_bias=bias, qk_norm="full")


def _experts(r, e_key, k_key):
    E = r.int(e_key, "experts")
    top = r.int(k_key, "experts")
    if top > E:
        r.fail(k_key, top, f"must be at most {e_key} = {E}")
    return E, top


def mixtral_config(r):      # softmax over all experts, top-k, renormalised
    def moe(r, kw):
        E, top = _experts(r, "num_local_experts", "num_experts_per_tok")
        return dict(n_experts=E, top_k=top, moe_renormalize=True)
    return _llama_like(r, "mixtral", attn_bias=False, o_bias=False, moe=moe)


def qwen2_moe_config(r):
    def moe(r, kw):
        layers, d = r.get("mlp_only_layers")
        if layers is not None and not (isinstance(layers, list) and all(is_int(i) for i in layers)):
            r.fail("mlp_only_layers", layers, "must be a list of layer indices", d)
        if layers:
            r.unsupported("mlp_only_layers", layers, "Qwen2-MoE with dense layers is not implemented")
        if r.int("decoder_sparse_step", "layers") != 1:
            r.unsupported("decoder_sparse_step", r.c["decoder_sparse_step"],
                          "Qwen2-MoE with dense layers is not implemented")
        E, top = _experts(r, "num_experts", "num_experts_per_tok")
        return dict(n_experts=E, top_k=top, d_ff=r.int("moe_intermediate_size"),
                    moe_renormalize=r.flag("norm_topk_prob"),
                    d_ff_shared=r.int("shared_expert_intermediate_size", lo=0, none_ok=True) or 0)
    bias = r.flag("qkv_bias")
    return _llama_like(r, "qwen2_moe", attn_bias=bias, o_bias=False, moe=moe)


def gpt2_config(r):
    """GPT-2: LayerNorm, learned positions, fused c_attn, Conv1D weights, GELU (tanh), tied."""
    D, N, _, H = _heads(r, "n_embd", "n_head", None, None)
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if r.flag(key) != want:
            r.unsupported(key, not want, f"only {key} = {str(want).lower()} is implemented")
    return _finish(r, dict(
        family="gpt2", vocab_size=r.int("vocab_size", "vocab"), d_model=D, n_layers=r.n_layers("n_layer"),
        n_heads=N, n_kv_heads=N, d_head=H, d_ff=r.int("n_inner", none_ok=True) or 4 * D, norm="layer",
        norm_eps=r.real("layer_norm_epsilon"), act=r.act("activation_function"), attn_bias=True,
        o_bias=True, mlp_bias=True, pos_embedding="learned", max_positions=r.int("n_positions", "positions"),
        tie_embeddings=r.flag("tie_word_embeddings")))


def gptj_config(r):
    """GPT-J: parallel block, one LayerNorm, interleaved partial rotary on ``rotary_dim`` dims
    (theta 10000, hard-coded in HF's create_sinusoidal_positions), biased head."""
    D, N, _, H = _heads(r, "n_embd", "n_head", None, None)
    rd = r.int("rotary_dim", none_ok=True)
    if rd is None:
        r.unsupported("rotary_dim", None, "GPT-J without rotary_dim is not implemented")
    if rd % 2 or rd > H:
        r.fail("rotary_dim", rd, f"must be even and at most the head dimension {H}")
    return _finish(r, dict(
        family="gptj", vocab_size=r.int("vocab_size", "vocab"), d_model=D, n_layers=r.n_layers("n_layer"),
        n_heads=N, n_kv_heads=N, d_head=H, d_ff=r.int("n_inner", none_ok=True) or 4 * D, norm="layer",
        norm_eps=r.real("layer_norm_epsilon"), act=r.act("activation_function"), mlp_bias=True,
        rotary_dim=rd, rope_interleaved=True, rope_theta=10000.0,
        tie_embeddings=r.flag("tie_word_embeddings"), extra={"head_bias": True}))


def phi_config(r):
    """Phi-1/2: GPT-J's layout, biases everywhere, rotate_half partial rotary (default half)."""
    if r.flag("qk_layernorm"):
        r.unsupported("qk_layernorm", True, "Phi with LayerNorm on q/k is not implemented")
    k = _common(r)
    thetas, factor = _rope(r, partial_ok=True)
    return _finish(r, dict(
        family="gptj", **k, norm="layer", norm_eps=r.real("layer_norm_eps"), act=r.act("hidden_act"),
        attn_bias=True, o_bias=True, mlp_bias=True, rotary_dim=_rotary_dim(r, k["d_head"], factor),
        rope_theta=thetas["full_attention"], extra={"head_bias": True}))


def neox_config(r):
    """GPT-NeoX: own LayerNorm per branch; parallel residual (or sequential, as GPT-2 with RoPE);
    per-head fused QKV; partial rotary (``rotary_pct``, default a quarter)."""
    D, N, _, H = _heads(r, kv_key=None, head_dim_key=None)
    thetas, factor = _rope(r, partial_ok=True)
    bias = r.flag("attention_bias")
    return _finish(r, dict(
        family="neox" if r.flag("use_parallel_residual") else "gpt2", vocab_size=r.int("vocab_size", "vocab"),
        d_model=D, n_layers=r.n_layers("num_hidden_layers"), n_heads=N, n_kv_heads=N, d_head=H,
        d_ff=r.int("intermediate_size"), tie_embeddings=r.flag("tie_word_embeddings"), norm="layer",
        norm_eps=r.real("layer_norm_eps"), act=r.act("hidden_act"), attn_bias=bias, o_bias=bias,
        mlp_bias=True, rotary_dim=_rotary_dim(r, H, factor), rope_theta=thetas["full_attention"]))


BUILDERS = {
    "gemma3_text": gemma3_config, "gemma2": gemma2_config, "llama": llama_config,
    "mistral": mistral_config, "qwen2": qwen2_config, "qwen3": qwen3_config, "olmo2": olmo2_config,
    "mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config, "gpt2": gpt2_config, "gptj": gptj_config,
    "phi": phi_config, "gpt_neox": neox_config,
}
assert set(BUILDERS) == set(HF_DEFAULTS)


def model_config(config, source=None, layers_found=None):
    """The validated :class:`~minipatch.config.ModelConfig` of a config.json dict (see the module
    docstring). ``layers_found``: layer indices present in the checkpoint, if known."""
    r = HFConfig(config, source, layers_found)
    return BUILDERS[r.model_type](r)
