"""minipatch models -> Hugging Face checkpoint folders (``config.json`` + ``model.safetensors``).

The inverse of the loader (:mod:`minipatch.io.hf`): the config is rebuilt from the
:class:`~minipatch.config.ModelConfig`, and every tensor name goes back through the family's name
table (:mod:`minipatch.io.hf_tables`), inverted. Parameters are stored as minipatch holds them,
which is Hugging Face's convention: Gemma's norm weights are ``g`` (the multiplier is ``1 + g``,
``norm_offset``), tied embeddings are written once (no ``lm_head.weight``). Before anything is
written, the new config.json is read back through the loader's own validation and must give the
same ModelConfig, and the tensor index must match it (:func:`~minipatch.io.hf.check_checkpoint`).

Supported: ``gemma3`` (written as ``gemma3_text``) and ``llama`` (as ``llama``: no sliding
windows, no q/k norms, the same bias on q/k/v and o). A model edited by
:func:`~minipatch.thought.condensed_model` keeps its architecture, so a condensed prompt becomes a
checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained`` runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..errors import ModelFileError, UnsupportedArchitectureError

_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "gelu": "gelu", "relu": "relu"}


def _int_if_whole(x):
    """Hugging Face declares some float-valued fields as int (query_pre_attn_scalar)."""
    return int(x) if x is not None and float(x).is_integer() else x


def _gemma3(c):
    layer_types = [{"full": "full_attention", "sliding": "sliding_attention"}[c.layer_type(i)]
                   for i in range(c.n_layers)]
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.d_head, "hidden_activation": _ACT[c.act],
            "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.attn_bias,
            "query_pre_attn_scalar": _int_if_whole(c.query_pre_attn_scalar), "sliding_window": c.sliding_window or 4096,
            "layer_types": layer_types, "attn_logit_softcapping": c.attn_softcap,
            "final_logit_softcapping": c.final_softcap, "use_bidirectional_attention": False,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta},
                "full_attention": {"rope_type": "default", "rope_theta": c.rope_theta}}}


def _llama(c):
    if c.layer_types or c.qk_norm != "none" or c.attn_bias != c.o_bias:
        raise UnsupportedArchitectureError("export: this llama-family model is not a plain 'llama' "
                                           "(sliding windows, q/k norms or o_proj bias differ)")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.d_head, "hidden_act": _ACT[c.act],
            "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.attn_bias,
            "mlp_bias": c.mlp_bias, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}


BUILDERS = {"gemma3": _gemma3, "llama": _llama}


def hf_config(cfg, extra=None):
    """The config.json dict of a :class:`~minipatch.config.ModelConfig` (families of :data:`BUILDERS`).

    ``extra``: further keys (token ids, ``max_position_embeddings``) that do not change the
    architecture. The result is checked: the loader must read it back as ``cfg``.
    """
    from .hf_builders import model_config

    if cfg.family not in BUILDERS:
        raise UnsupportedArchitectureError(f"export: family {cfg.family!r} is not supported; one of {sorted(BUILDERS)}")
    out = BUILDERS[cfg.family](cfg)
    for k, v in (extra or {}).items():
        if k in out or k == "layer_types":
            raise ModelFileError(f"export: extra key {k!r} would change the architecture")
        out[k] = v
    back = model_config(out, "exported config")
    if back != cfg:
        diff = [f.name for f in cfg.__dataclass_fields__.values() if getattr(back, f.name) != getattr(cfg, f.name)]
        raise UnsupportedArchitectureError(f"export: config.json cannot express this model (fields {diff})")
    return out


def hf_tensors(model):
    """{Hugging Face name: numpy array} of ``model``'s parameters, through the inverted name table."""
    from .hf import TABLES

    mt = BUILDERS[model.cfg.family](model.cfg)["model_type"]
    table = TABLES[mt]
    inverse = {}
    for hf_name, target in table.items():
        if not isinstance(target, str):
            raise UnsupportedArchitectureError(f"export: {hf_name!r} is stored transformed; not supported")
        inverse.setdefault(target, hf_name)
    out = {}
    for k, a in model.params.items():
        if k != "layers":
            out[inverse[k]] = np.asarray(to_numpy(a))
    for i, lp in enumerate(model.params["layers"]):
        for k, a in lp.items():
            if k not in inverse:
                raise UnsupportedArchitectureError(f"export: no Hugging Face name for layer parameter {k!r}")
            out[inverse[k].replace("{i}", str(i))] = np.asarray(to_numpy(a))
    return dict(sorted(out.items()))


def save_pretrained(model, path, extra=None):
    """Write ``model`` as a Hugging Face folder: ``path/config.json`` and ``path/model.safetensors``
    (the model's dtype). Returns the folder. ``extra``: as in :func:`hf_config`."""
    from .hf import check_checkpoint
    from .safetensors import write_safetensors

    config = hf_config(model.cfg, extra)
    config["dtype"] = str(np.dtype(str(model.dtype)))
    tensors = hf_tensors(model)
    check_checkpoint(config, {k: (a.dtype.name, a.shape) for k, a in tensors.items()}, "export")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    return folder


__all__ = ["BUILDERS", "hf_config", "hf_tensors", "save_pretrained"]
