"""A strict, dependency-free safetensors reader (and a small writer) in numpy.

File layout (https://github.com/huggingface/safetensors, "Format"):

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  JSON object: name -> {"dtype", "shape", "data_offsets": [begin, end]},
               plus an optional "__metadata__": {str: str}
    [rest]     the byte buffer; offsets are relative to its start

Policy (the same as the reference Rust implementation, ``safetensors::SafeTensors::validate``):

- The header must be valid UTF-8 JSON whose top level is an object, at most 100 MB long, and
  with no duplicate keys. Trailing spaces inside the N header bytes are allowed (JSON whitespace).
- Every tensor entry has exactly the keys ``dtype``, ``shape`` and ``data_offsets``.
- ``end - begin == prod(shape) * itemsize`` for every tensor.
- **No overlaps, no holes, no trailing garbage**: sorted by offset, the tensors tile the buffer
  exactly, from byte 0 to the last byte of the file. Bytes after the last tensor are rejected, as
  are unused bytes between tensors (they are either corruption or data we would silently ignore).
- BOOL bytes must be 0 or 1.

Every violation raises :class:`minipatch.errors.ModelFileError`. The reader never unpickles
anything: tensors are ``np.frombuffer`` views of a read-only memory map, copied before returning.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import numpy as np

from minipatch.errors import ModelFileError
from minipatch.io.files import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, open_regular, read_regular
from minipatch.validate import check_float_dtype

__all__ = ["read_safetensors", "read_safetensors_index", "read_checkpoint_folder", "read_checkpoint_index",
           "safetensors_layout", "safetensors_bytes", "write_safetensors", "DTYPES", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100_000_000
"""Largest accepted JSON header (the reference implementation's limit)."""

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),  # one byte per element, 0 or 1
}
"""safetensors dtype name -> numpy dtype of the stored bytes."""

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _fail(path, msg):
    raise ModelFileError(f"{path}: {msg}")


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ModelFileError(f"duplicate key {key!r} in JSON")
        out[key] = value
    return out


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: header is not valid UTF-8 ({e})") from e
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: header: {e}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        _fail(path, f"header must be a JSON object, got {type(header).__name__}")
    return header


def _validate_entries(path, header: dict, buffer_len: int) -> list:
    """Check every entry; return [(name, dtype_name, shape, begin, end)] sorted by offset."""
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        _fail(path, "__metadata__ must be an object mapping strings to strings")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            _fail(path, f"{where}: entry must be an object, got {type(info).__name__}")
        if set(info) != _ENTRY_KEYS:
            _fail(path, f"{where}: entry keys must be {sorted(_ENTRY_KEYS)}, got {sorted(info)}")
        dtype_name = info["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            _fail(path, f"{where}: unknown or unsupported dtype {dtype_name!r} "
                        f"(supported: {', '.join(DTYPES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            _fail(path, f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            _fail(path, f"{where}: data_offsets must be [begin, end] ints, got {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end:
            _fail(path, f"{where}: data_offsets {offs} must satisfy 0 <= begin <= end")
        if end > buffer_len:
            _fail(path, f"{where}: data_offsets {offs} run past the end of the "
                        f"{buffer_len}-byte data buffer (file truncated?)")
        nbytes = math.prod(shape) * DTYPES[dtype_name].itemsize
        if end - begin != nbytes:
            _fail(path, f"{where}: data_offsets {offs} span {end - begin} bytes but "
                        f"shape {shape} of {dtype_name} needs {nbytes}")
        entries.append((name, dtype_name, tuple(shape), begin, end))

    entries.sort(key=lambda e: (e[3], e[4]))
    pos, prev = 0, None
    for name, _, _, begin, end in entries:
        if begin < pos:
            _fail(path, f"tensor {name!r} at [{begin}, {end}) overlaps tensor {prev!r} "
                        f"ending at {pos}")
        if begin > pos:
            _fail(path, f"unused bytes [{pos}, {begin}) before tensor {name!r} "
                        "(holes in the data buffer are not allowed)")
        pos, prev = end, name
    if pos != buffer_len:
        _fail(path, f"{buffer_len - pos} trailing bytes after the last tensor "
                    "(trailing garbage is not allowed)")
    return entries


def _decode(mm, start: int, dtype_name: str, shape: tuple, dtype, path, name) -> np.ndarray:
    stored = DTYPES[dtype_name]
    count = math.prod(shape)
    if count == 0:
        raw = np.empty(0, dtype=stored)
    else:
        # Copy at once so that no view of the memory map outlives this line.
        raw = np.frombuffer(mm, dtype=stored, count=count, offset=start).copy()
    if dtype_name == "BF16":
        arr = (raw.astype(np.uint32) << 16).view(np.float32)
    elif dtype_name == "BOOL":
        if count and raw.max() > 1:
            _fail(path, f"tensor {name!r}: BOOL bytes must be 0 or 1")
        arr = raw.astype(np.bool_)
    else:
        arr = raw.astype(stored.newbyteorder("="), copy=False)
    arr = arr.reshape(shape)
    if dtype is not None and np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(dtype, copy=False)
    return arr


def _open_header(path):
    """(file, header, entries, data_start) of a safetensors file; the caller closes the file."""
    try:
        f = open_regular(path, "safetensors file")
    except FileNotFoundError as e:
        raise ModelFileError(f"{path}: cannot open (no such file)") from e
    try:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            _fail(path, f"file has {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little", signed=False)
        if n > MAX_HEADER_BYTES:
            _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            _fail(path, f"header length {n} runs past the end of the {size}-byte file")
        header = _parse_header(path, f.read(n))
        data_start = 8 + n
        entries = _validate_entries(path, header, size - data_start)
    except BaseException:
        f.close()
        raise
    return f, header, entries, data_start


def read_safetensors_index(path) -> dict[str, tuple[str, tuple]]:
    """The tensor index of a ``.safetensors`` file, without reading any tensor data.

    Returns:
      dict name -> (safetensors dtype name, shape), in header order; the whole header is
      validated exactly as :func:`read_safetensors` does.
    """
    path = os.fspath(path)
    f, header, entries, _ = _open_header(path)
    f.close()
    info = {name: (dt, shape) for name, dt, shape, _, _ in entries}
    return {name: info[name] for name in header if name != "__metadata__"}


def read_safetensors(path, dtype=None) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into fresh numpy arrays.

    Args:
      path: the file (a regular file: FIFOs, devices and links to them are refused unopened).
      dtype: if given, floating-point tensors (F64, F32, F16, BF16) are converted to it;
        integer and BOOL tensors keep their own dtype. BF16 is widened exactly to float32
        (bits shifted left by 16) before any conversion.
    Returns:
      dict name -> array (native byte order, C-contiguous, owning its memory), in file order.
    Raises:
      ModelFileError: for any malformed, truncated, inconsistent or unsupported file.
    """
    path = os.fspath(path)
    target = None if dtype is None else check_float_dtype(dtype)
    f, header, entries, data_start = _open_header(path)
    with f:
        if not entries:
            return {}
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            out = {
                name: _decode(mm, data_start + begin, dt, shape, target, path, name)
                for name, dt, shape, begin, _ in entries
            }
        finally:
            mm.close()
    # Return in header order, which is how writers list them.
    return {name: out[name] for name in header if name != "__metadata__"}


def read_checkpoint_index(path) -> tuple[dict, dict[str, tuple[str, tuple, str]]]:
    """``config.json`` and the tensor index of every shard of a checkpoint folder, no tensor data.

    Returns:
      (config dict, dict name -> (dtype name, shape, shard file name)). The same checks as
      :func:`read_checkpoint_folder` (duplicates across shards, the index file) are applied.
    """
    folder = Path(path)
    if not folder.is_dir():
        _fail(folder, "not a checkpoint folder (no such directory)")
    config = _read_json(folder / "config.json", what="config.json", limit=MAX_CONFIG_BYTES)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        _fail(folder, "no *.safetensors file in the checkpoint folder")
    index = {}
    for shard in shards:
        for name, (dt, shape) in read_safetensors_index(shard).items():
            if name in index:
                _fail(folder, f"tensor {name!r} appears in both {index[name][2]} and {shard.name}")
            index[name] = (dt, shape, shard.name)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists() or index_path.is_symlink():
        wmap = _read_json(index_path, what="safetensors index", limit=MAX_INDEX_BYTES).get("weight_map")
        if not isinstance(wmap, dict):
            _fail(index_path, "missing or invalid 'weight_map' object")
        if set(wmap) != set(index):
            missing, extra = set(wmap) - set(index), set(index) - set(wmap)
            _fail(index_path, f"weight_map disagrees with the shards: missing "
                              f"{sorted(missing)[:5]}, unlisted {sorted(extra)[:5]}")
        for name, shard_name in wmap.items():
            if shard_name != index[name][2]:
                _fail(index_path, f"weight_map puts {name!r} in {shard_name!r}, "
                                  f"found in {index[name][2]!r}")
    return config, index


def read_checkpoint_folder(path, dtype=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a Hugging Face checkpoint folder: ``config.json`` and every ``*.safetensors`` file.

    Shards are read in sorted file-name order. A tensor name that appears in two shards is
    rejected. If ``model.safetensors.index.json`` is present, its ``weight_map`` must name exactly
    the tensors found, each in the shard that holds it. Every file must be a regular file
    (a FIFO, device or directory named ``*.safetensors`` is refused, not skipped), and
    ``config.json`` at most :data:`MAX_CONFIG_BYTES` long.

    Returns:
      (config dict, dict name -> array); ``dtype`` as in :func:`read_safetensors`.
    Raises:
      ModelFileError: missing folder / config.json / weights, bad JSON, duplicates, bad shards.
    """
    folder = Path(path)
    config, index = read_checkpoint_index(folder)
    tensors = {}
    for shard in sorted({s for _, _, s in index.values()}):
        tensors.update(read_safetensors(folder / shard, dtype=dtype))
    return config, {name: tensors[name] for name in index}


def _read_json(path: Path, what: str, limit: int) -> dict:
    try:
        raw = read_regular(path, what, limit)
    except FileNotFoundError as e:
        raise ModelFileError(f"{path}: missing {what}") from e
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: bad {what}: {e}") from e
    except (ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: bad {what}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(obj, dict):
        _fail(path, f"bad {what}: top level must be a JSON object, got {type(obj).__name__}")
    return obj


# ---- writing ---------------------------------------------------------------------------------

_WRITE_NAMES = {np.dtype(v).str: k for k, v in DTYPES.items() if k not in ("BF16", "BOOL")}


def safetensors_layout(tensors, metadata=None):
    """(header dict, list of data chunks) of ``{name: array}``, tensors in the given order.

    Little-endian bytes; dtypes F64, F32, F16, I64, I32, I8, U8 and BOOL. ``metadata``: an
    optional ``{str: str}`` stored as ``__metadata__``.
    """
    header, chunks, pos = {}, [], 0
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ModelFileError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    for name, a in tensors.items():
        a = np.asarray(a)
        if not isinstance(name, str) or name == "__metadata__":
            raise ModelFileError(f"bad tensor name {name!r}")
        if a.dtype == np.bool_:
            kind, raw = "BOOL", np.ascontiguousarray(a).astype(np.uint8).tobytes()
        else:
            le = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
            kind = _WRITE_NAMES.get(np.dtype(le).str)
            if kind is None:
                raise ModelFileError(f"tensor {name!r}: dtype {a.dtype} cannot be written as safetensors")
            raw = np.ascontiguousarray(a, dtype=le).tobytes()
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return header, chunks


def safetensors_bytes(header, chunks):
    """The file bytes of a (header, chunks) layout: length, JSON header padded with spaces to a
    multiple of 8 bytes, data."""
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + b"".join(chunks)


def write_safetensors(path, tensors, metadata=None):
    """Write ``{name: array}`` to ``path`` as a safetensors file (readable by
    :func:`read_safetensors` and by the ``safetensors`` package)."""
    data = safetensors_bytes(*safetensors_layout(tensors, metadata))
    Path(path).write_bytes(data)
    return Path(path)
