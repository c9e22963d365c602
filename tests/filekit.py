"""Writers for the bad-input file tests: safetensors, checkpoint folders, tiny GGUF files.

Everything is built from ``tests/fixtures/`` (in the repository) or synthesised here, never
from the shared folder. The GGUF helpers need the ``gguf`` package (``minipatch[gguf]``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"

def st_bytes(tensors, header_edit=None):
    """safetensors bytes of {name: array} (minipatch's writer), ``header_edit(header)`` applied last."""
    from minipatch.io.safetensors import safetensors_bytes, safetensors_layout

    header, chunks = safetensors_layout(tensors)
    if header_edit is not None:
        header_edit(header)
    return safetensors_bytes(header, chunks)


def read_f64_safetensors(path):
    """{name: float64 array} of a float64 safetensors file, e.g. an HF fixture's weights (own
    reader, no minipatch)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for k, h in header.items():
        assert h["dtype"] == "F64"
        a, b = h["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], "<f8").reshape(h["shape"]).copy()
    return out


def read_fixture(name):
    """(config dict, {HF name: float64 array}) of ``tests/fixtures/<name>`` (own reader, no minipatch)."""
    folder = FIXTURES / name
    return json.loads((folder / "config.json").read_text()), read_f64_safetensors(folder / "model.safetensors")


def write_folder(dst, config, tensors, header_edit=None):
    """A checkpoint folder: config.json (dict, or raw str/bytes) and model.safetensors."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, (bytes, str)) else json.dumps(config)
    (dst / "config.json").write_bytes(cfg.encode() if isinstance(cfg, str) else cfg)
    (dst / "model.safetensors").write_bytes(st_bytes(tensors, header_edit))
    return dst


def copy_fixture(name, dst):
    dst = Path(dst)
    shutil.copytree(FIXTURES / name, dst)
    return dst


def digest(paths):
    """sha256 of every regular file under ``paths`` (folders recursed), by relative name."""
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink()) if p.is_dir() else [p]
        for q in files:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
    return out


# ---- GGUF ---------------------------------------------------------------------------------------

LLAMA_GGUF = dict(vocab=32, d=16, layers=2, heads=2, kv=1, head_dim=8, ff=24, eps=1e-5, ctx=64, theta=10000.0)


def llama_gguf_tensors(seed=0, c=LLAMA_GGUF):
    """GGUF-named float32 tensors of a tiny random llama (numpy shape = HF (out, in))."""
    rng = np.random.default_rng(seed)
    d, q, kv, f = c["d"], c["heads"] * c["head_dim"], c["kv"] * c["head_dim"], c["ff"]
    t = {"token_embd.weight": rng.standard_normal((c["vocab"], d)),
         "output_norm.weight": np.exp(0.5 * rng.standard_normal(d)),
         "output.weight": rng.standard_normal((c["vocab"], d)) / 4}
    for i in range(c["layers"]):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": np.exp(0.5 * rng.standard_normal(d)),
                  b + "attn_q.weight": rng.standard_normal((q, d)) / 4,
                  b + "attn_k.weight": rng.standard_normal((kv, d)) / 4,
                  b + "attn_v.weight": rng.standard_normal((kv, d)) / 4,
                  b + "attn_output.weight": rng.standard_normal((d, q)) / 4,
                  b + "ffn_norm.weight": np.exp(0.5 * rng.standard_normal(d)),
                  b + "ffn_gate.weight": rng.standard_normal((f, d)) / 4,
                  b + "ffn_up.weight": rng.standard_normal((f, d)) / 4,
                  b + "ffn_down.weight": rng.standard_normal((d, f)) / 5})
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_llama_gguf(path, tensors=None, meta=None, drop=(), c=LLAMA_GGUF):
    """A tiny llama GGUF. ``meta``: {key: (kind, value)} overriding or adding metadata, kind one of
    'uint32', 'int32', 'float32', 'string', 'bool', 'array'; ``drop``: metadata keys to leave out."""
    import gguf

    tensors = llama_gguf_tensors() if tensors is None else tensors
    base = {"llama.block_count": ("uint32", c["layers"]), "llama.context_length": ("uint32", c["ctx"]),
            "llama.embedding_length": ("uint32", c["d"]), "llama.feed_forward_length": ("uint32", c["ff"]),
            "llama.attention.head_count": ("uint32", c["heads"]),
            "llama.attention.head_count_kv": ("uint32", c["kv"]),
            "llama.attention.key_length": ("uint32", c["head_dim"]),
            "llama.attention.value_length": ("uint32", c["head_dim"]),
            "llama.attention.layer_norm_rms_epsilon": ("float32", c["eps"]),
            "llama.rope.freq_base": ("float32", c["theta"]), "llama.vocab_size": ("uint32", c["vocab"])}
    base.update(meta or {})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in base.items():
        if key in drop:
            continue
        getattr(w, f"add_{kind}")(key, value)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def gguf_info_offset(data, name):
    """Byte offset of the tensor-info entry of ``name`` (its type field and data offset follow
    the dims): returns (type_pos, offset_pos)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_pos = at + 4 + 8 * n_dims
    return type_pos, type_pos + 4


def patch_gguf(path, name, *, ggml_type=None, offset_from=None, offset_delta=0):
    """Rewrite tensor ``name``'s info in place: its type, or its data offset (copied from tensor
    ``offset_from`` and/or shifted by ``offset_delta``)."""
    data = bytearray(Path(path).read_bytes())
    type_pos, off_pos = gguf_info_offset(bytes(data), name)
    if ggml_type is not None:
        struct.pack_into("<I", data, type_pos, ggml_type)
    if offset_from is not None or offset_delta:
        base = struct.unpack_from("<Q", data, off_pos)[0]
        if offset_from is not None:
            base = struct.unpack_from("<Q", data, gguf_info_offset(bytes(data), offset_from)[1])[0]
        struct.pack_into("<Q", data, off_pos, base + offset_delta)
    Path(path).write_bytes(bytes(data))
    return Path(path)
