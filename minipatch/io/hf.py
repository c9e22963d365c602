"""Hugging Face configs and checkpoints -> minipatch models.

``config_from_hf`` turns a config.json dict into a ModelConfig (defaults, validation and one
builder per model_type, each stating the HF semantics it relies on, live in
``minipatch.io.config_check``); ``check_checkpoint`` cross-checks a config against a tensor
index (names, dtypes, shapes) before any data is read; ``map_tensors`` applies the family's
name table from ``minipatch.io.hf_tables``; ``model_from_hf`` builds the Model, refusing
non-finite weights and weights that overflow the requested dtype.

Supported model_type: gemma3_text, gemma2, llama, mistral, qwen2, qwen3, olmo2, mixtral,
qwen2_moe, gpt2, gptj, phi, gpt_neox.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import ModelFileError, ShapeError

from .hf_tables import (GEMMA, GPT2, GPTJ, IGNORED, LLAMA, MIXTRAL, OLMO2, PHI,  # noqa: F401
                        QWEN2_MOE, QWEN3, neox_table)

from .config_check import HF_DEFAULTS
from .hf_builders import model_config
from .tensor_index import check_tensor_index, layer_indices

# model_type -> name table, or a table builder taking the config dict (GPT-NeoX's fused QKV)
TABLES = {
    "gemma3_text": GEMMA, "gemma2": GEMMA, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA,
    "qwen3": QWEN3, "olmo2": OLMO2, "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "gpt2": GPT2,
    "gptj": GPTJ, "phi": PHI, "gpt_neox": neox_table,
}
assert set(TABLES) == set(HF_DEFAULTS)

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


def config_from_hf(config, source=None):
    """The validated ModelConfig of a config.json dict (``minipatch.io.config_check``).

    Raises ConfigError naming the field and value (and ``source``, the file), or
    UnsupportedArchitectureError.
    """
    return model_config(config, source)


def _table(config, cfg):
    t = TABLES[config["model_type"]]
    return t({"num_attention_heads": cfg.n_heads, "hidden_size": cfg.d_model}) if callable(t) else t


def _layer_table_keys(model_type):
    t = TABLES[model_type]
    return t({"num_attention_heads": 1, "hidden_size": 1}) if callable(t) else t


def expected_shapes(cfg):
    """Internal parameter name -> shape (per-layer names prefixed ``layers.{i}.``) for ``cfg``."""
    from ..blocks import layer_shapes, spec_for
    from ..model import top_shapes

    out = dict(top_shapes(cfg))
    per = layer_shapes(spec_for(cfg), cfg)
    for i in range(cfg.n_layers):
        out.update({f"layers.{i}.{k}": s for k, s in per.items()})
    return out


def check_checkpoint(config, index, source=None):
    """Validate a config.json dict against a checkpoint's tensor index, before any data is read.

    Args:
      config: the config dict; index: HF tensor name -> (dtype name, shape).
    Returns:
      the ModelConfig.
    Raises:
      ConfigError / UnsupportedArchitectureError (the config alone, or its layer count against
      the layers the checkpoint holds), ModelFileError (a tensor's dtype or shape).
    """
    import re as _re

    mt = config.get("model_type") if isinstance(config, dict) else None
    found = layer_indices(index, _layer_table_keys(mt)) if isinstance(mt, str) and mt in TABLES else None
    cfg = model_config(config, source, layers_found=found)
    try:
        check_tensor_index(cfg, _table(config, cfg), index, [_re.compile(p) for p in IGNORED],
                           expected_shapes(cfg), source)
    except ModelFileError as e:
        omitted = [k for k in _SHAPE_KEYS if k in HF_DEFAULTS[mt] and k not in config]
        if omitted and "has shape" in str(e):
            raise ModelFileError(f"{e}; config.json omits {', '.join(omitted)}, so the Hugging Face "
                                 f"defaults for {mt!r} were used") from None
        raise
    return cfg


_SHAPE_KEYS = ("vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner", "num_attention_heads",
               "n_head", "num_key_value_heads", "head_dim", "moe_intermediate_size",
               "shared_expert_intermediate_size", "num_local_experts", "num_experts", "n_positions")


def _index_of(tensors, source):
    where = f"{source}: " if source else ""
    if not isinstance(tensors, dict):
        raise ModelFileError(f"{where}tensors must be a dict name -> array, got {type(tensors).__name__}")
    out = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or not isinstance(a, np.ndarray):
            raise ModelFileError(f"{where}tensor {name!r} must be a numpy array under a str name, "
                                 f"got {type(a).__name__}")
        out[name] = (a.dtype.name, a.shape)
    return out


def _check_finite(name, a, source, target):
    """ModelFileError naming the tensor if it holds NaN/inf, or values beyond ``target``'s range
    (a float64 checkpoint with |w| > 3.4e38 would turn into inf in float32)."""
    if a.dtype.kind != "f":
        return
    where = f"{source}: " if source else ""
    finite = np.isfinite(a)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ModelFileError(f"{where}tensor {name!r} holds {int(a.size - np.count_nonzero(finite))} non-finite "
                             f"value(s), first {float(a[first])!r} at index {first}")
    big = float(np.finfo(target).max)
    if a.dtype.itemsize > target.itemsize and a.size and float(np.max(np.abs(a))) > big:
        first = tuple(int(i) for i in np.argwhere(np.abs(a) > big)[0])
        raise ModelFileError(f"{where}tensor {name!r} holds {float(a[first])!r} at index {first}, beyond the "
                             f"{target.name} range (max {big:.3g}): it would become inf; load with dtype='float64'")


def model_from_hf(config, tensors, dtype="float64", *, source=None):
    """A Model from an HF config dict and HF-named tensors (numpy).

    The config is validated and cross-checked against the tensors' names, dtypes and shapes
    (:func:`check_checkpoint`); every weight must be finite, and stay finite in ``dtype``
    (``'float32'`` or ``'float64'``). Never modifies ``config`` or ``tensors``.
    """
    from ..backend import to
    from ..model import Model
    from ..validate import check_float_dtype

    target = check_float_dtype(dtype)
    index = _index_of(tensors, source)
    cfg = check_checkpoint(config, index, source)
    ignored = [re.compile(p) for p in IGNORED]
    used = {k: v for k, v in tensors.items() if not any(r.match(k) for r in ignored)}
    for name, a in used.items():
        _check_finite(name, a, source, target)
    top, layers = map_tensors(used, _table(config, cfg), cfg.n_layers)
    if cfg.tie_embeddings:
        top.pop("lm_head.weight", None)
    params = to(dict(top, layers=layers), dtype=target)
    try:
        return Model(cfg, params)
    except ShapeError as e:
        where = f"{source}: " if source else ""
        raise ModelFileError(f"{where}checkpoint does not match its config: {e}") from None


def load_folder(path, dtype="float64"):
    """A Model from a Hugging Face checkpoint folder: config.json and the shards' tensor index are
    checked against each other before any tensor data is read."""
    from pathlib import Path

    from ..validate import check_float_dtype
    from .safetensors import read_checkpoint_index, read_safetensors

    check_float_dtype(dtype)
    folder = Path(path)
    config, index = read_checkpoint_index(folder)
    source = folder / "config.json"
    check_checkpoint(config, {k: (dt, shape) for k, (dt, shape, _) in index.items()}, source)
    tensors = {}
    for shard in sorted({s for _, _, s in index.values()}):
        tensors.update(read_safetensors(folder / shard))
    return model_from_hf(config, {k: tensors[k] for k in index}, dtype, source=source)
