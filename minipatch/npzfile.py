"""``.npz`` files of plain arrays, read and written safely (audit references, patch files).

Reading never calls ``np.load`` and never unpickles: each member's ``.npy`` header is parsed
first, object arrays are refused, the zip entry's sizes must be possible (deflate expands at
most :data:`DEFLATE_MAX_RATIO` times) and its uncompressed size must be exactly the header
plus what the declared shape and dtype imply -- all before any data is inflated. A caller's
``bound`` check sees every member's declared (shape, dtype) and may refuse the file before
anything is read; members the caller does not use are never inflated.
"""
from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import ModelFileError

DEFLATE_MAX_RATIO = 1032   # deflate cannot expand more than this: bounds what a member may claim


def physical_memory():
    """Bytes of physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):   # pragma: no cover - non-POSIX
        return None


def _read_npy_header(f, name):
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ModelFileError(f"member {name!r}: unsupported .npy version {version}")
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    return read_header(f)


def _member_header(zf, info, disk_size):
    """(shape, fortran, dtype) of one ``.npy`` member, from its header alone (see module doc)."""
    if info.compress_size > disk_size or info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise ModelFileError(f"member {info.filename!r} claims {info.file_size} bytes: inconsistent zip")
    with zf.open(info) as f:
        shape, fortran, dtype = _read_npy_header(f, info.filename)
        if dtype.hasobject:
            raise ModelFileError(f"member {info.filename!r} is an object array (pickled Python objects); "
                                 "refused, never unpickled: save plain numeric arrays")
        nbytes = math.prod(shape) * dtype.itemsize
        if f.tell() + nbytes != info.file_size:
            raise ModelFileError(f"member {info.filename!r}: header says {shape} {dtype} ({nbytes} bytes), "
                                 f"the member holds {info.file_size - f.tell()}")
    return shape, fortran, dtype


def _member_data(zf, info, header):
    """The member's array; its size was bounded by :func:`_member_header`."""
    shape, fortran, dtype = header
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        with zf.open(info) as f:
            _read_npy_header(f, info.filename)
            data = f.read(nbytes) + f.read()   # the second read reaches EOF, so zipfile checks the CRC
        if len(data) != nbytes:
            raise ModelFileError(f"member {info.filename!r} is truncated")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()
    except MemoryError:
        raise ModelFileError(f"member {info.filename!r} of shape {shape} {dtype} needs {2 * nbytes} bytes "
                             "to read: out of memory") from None


def read_npz(path, used, what="file", bound=None):
    """The members of an ``.npz`` that ``used(name)`` selects, as plain numpy arrays.

    Args:
      path: the file (must be a regular file: ``minipatch.io.files.open_regular``).
      used: predicate on a member name (without ``.npy``); the others are checked by header only.
      what: what the file is, for messages (e.g. ``'reference file'``).
      bound: optional ``bound(path, headers)`` called with {name: (shape, fortran, dtype)} of the
        selected members before anything is inflated; it raises ModelFileError to refuse.
    Returns:
      {name: array}.
    Raises:
      ModelFileError naming the file and the member (also for a file too large for memory);
      never unpickles, never returns an object array.
    """
    from .io.files import open_regular

    try:
        f = open_regular(path, what)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: {what} not found") from None
    try:
        with f, zipfile.ZipFile(f) as zf:
            disk_size = os.fstat(f.fileno()).st_size
            headers, infos = {}, {}
            for info in zf.infolist():
                name = info.filename[:-4]
                if not info.filename.endswith(".npy") or name in headers:
                    raise ModelFileError(f"member {info.filename!r} is not a (unique) .npy array")
                headers[name], infos[name] = _member_header(zf, info, disk_size), info
            chosen = {k: h for k, h in headers.items() if used(k)}
            if bound is not None:
                bound(path, chosen)
            total = sum(math.prod(sh) * dt.itemsize for sh, _, dt in chosen.values())
            mem = physical_memory()
            if mem is not None and 2 * total > mem:
                raise ModelFileError(f"{path}: the {what}'s arrays declare {total} bytes; with this machine's "
                                     f"{mem} bytes of memory they cannot be read")
            return {k: _member_data(zf, infos[k], h) for k, h in chosen.items()}
    except ModelFileError as e:
        raise ModelFileError(e.args[0] if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except Exception as e:   # any parse failure of a damaged file (BadZipFile, zlib.error, ...)
        raise ModelFileError(f"{path}: not a readable .npz of plain arrays "
                             f"({type(e).__name__}: {e})") from None


KINDS = {"iu": "integer", "f": "real floating", "U": "text", "b": "boolean"}


def check_array(path, name, a, ndim, kinds):
    """Raise ModelFileError unless ``a`` is an ``ndim``-D array of a dtype kind in ``kinds``
    (``'iu'``, ``'f'``, ``'U'``, ``'b'``), finite if floating."""
    if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in kinds:
        raise ModelFileError(f"{path}: {name} must be a {ndim}-D {KINDS[kinds]} array, got "
                             f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ModelFileError(f"{path}: {name} holds non-finite values")


def text(path, name, a):
    """The string held by a 0-d text member ``a`` (ModelFileError otherwise)."""
    check_array(path, name, a, 0, "U")
    return str(a[()])


def write_npz(path, arrays):
    """Write {name: array} as an uncompressed ``.npz`` (member order as given), atomically.

    Refuses object arrays (they would need pickling to read back). Returns the path.
    """
    path = Path(path)
    plain = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise ModelFileError(f"{path}: member {k!r} is an object array; only plain arrays are written")
        plain[k] = a
    buf = io.BytesIO()
    np.savez(buf, **plain)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path
