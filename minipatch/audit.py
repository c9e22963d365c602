"""``python -m minipatch audit PATH --reference REF.npz``: check another implementation.

PATH is a Hugging Face checkpoint folder or a ``.gguf`` file. REF.npz (plain arrays only:
each member's header is checked before its data is read, and nothing is ever unpickled)
holds ``input_ids`` [T], ``logits`` [T, V] and optionally ``hidden_states`` [L+1, T, D]
(Hugging Face layout: [0] embeddings, [i] after layer i, [L] after the final norm) and
``context_positions``. The audit reports:

- the max absolute and relative logit error (relative to max |reference logits|);
- the first layer whose hidden state diverges beyond ``rtol`` (null if none);
- with context positions, the theorem on that checkpoint: the patched-without-context
  logits at the kept positions against our with-context logits and against the reference
  logits, plus the unpatched error as the negative control.

``ok`` is true iff the logits and every hidden state agree within ``rtol`` and the
patched logits agree with ours within ``rtol`` and with the reference within ``rtol``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from .errors import MinipatchError, ModelFileError

KEYS = ("arch", "logits_max_abs_err", "logits_max_rel_err", "first_divergent_layer",
        "absorb_max_rel_err_self", "absorb_max_rel_err_reference", "unpatched_max_rel_err", "ok")
DEFLATE_MAX_RATIO = 1032   # deflate cannot expand more than this: bounds what a member may claim


def _rel(a, b):
    """max |a - b| / max |b| (0 for equal arrays; inf if b is zero and a is not)."""
    diff, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


USED = ("input_ids", "logits", "hidden_states", "context_positions")
"""The members the audit reads; any other member's header is checked, its data never inflated."""


def _physical_memory():
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
    """(shape, fortran, dtype) of one ``.npy`` member, from its header alone.

    The zip entry's sizes must be possible (deflate expands at most DEFLATE_MAX_RATIO times) and
    its uncompressed size must be exactly the header plus what the declared shape and dtype
    imply -- checked before any data is inflated.
    """
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


def _bound(path, headers, expect):
    """Refuse, before inflating anything, members whose declared shapes cannot fit the reference
    ([T], [T, V], [L+1, T, D], [C <= T]) or the model (``expect``: vocab_size, n_layers, d_model),
    or whose total exceeds the physical memory."""
    def shape(k):
        return headers[k][0] if k in headers else None

    ids, lg, hs, cp = shape("input_ids"), shape("logits"), shape("hidden_states"), shape("context_positions")
    T = ids[0] if ids is not None and len(ids) == 1 else None
    if T is not None and lg is not None and len(lg) == 2 and lg[0] != T:
        raise ModelFileError(f"{path}: input_ids {ids} and logits {lg} do not fit [T], [T, V]")
    if lg is not None and len(lg) == 2 and expect.get("vocab_size") not in (None, lg[1]):
        raise ModelFileError(f"{path}: reference has {lg[1]} logits per token, the model {expect['vocab_size']}")
    if T is not None and hs is not None and len(hs) == 3:
        if hs[1] != T:
            raise ModelFileError(f"{path}: hidden_states {hs} is not [L+1, T, D] with T = {T}")
        L, D = expect.get("n_layers"), expect.get("d_model")
        if L is not None and (hs[0] != L + 1 or hs[2] != D):
            raise ModelFileError(f"reference hidden_states {hs} do not fit the model: [L+1, T, D] = "
                                 f"[{L + 1}, {T}, {D}]")
    if T is not None and cp is not None and len(cp) == 1 and cp[0] > T:
        raise ModelFileError(f"{path}: context_positions has {cp[0]} entries for {T} tokens")
    total = sum(math.prod(sh) * dt.itemsize for sh, _, dt in headers.values())
    mem = _physical_memory()
    if mem is not None and 2 * total > mem:
        raise ModelFileError(f"{path}: the reference's arrays declare {total} bytes; with this machine's "
                             f"{mem} bytes of memory they cannot be read")


def _read_npz(path, expect=None):
    """The used members of an .npz as plain arrays, without ``np.load`` and never unpickling."""
    from .io.files import open_regular

    try:
        f = open_regular(path, "reference file")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: reference file not found") from None
    try:
        with f, zipfile.ZipFile(f) as zf:
            disk_size = os.fstat(f.fileno()).st_size
            headers, infos = {}, {}
            for info in zf.infolist():
                name = info.filename[:-4]
                if not info.filename.endswith(".npy") or name in headers:
                    raise ModelFileError(f"member {info.filename!r} is not a (unique) .npy array")
                headers[name], infos[name] = _member_header(zf, info, disk_size), info
            used = {k: h for k, h in headers.items() if k in USED}
            _bound(path, used, expect or {})
            return {k: _member_data(zf, infos[k], h) for k, h in used.items()}
    except ModelFileError as e:
        raise ModelFileError(e.args[0] if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except Exception as e:   # any parse failure of a damaged file (BadZipFile, zlib.error, ...)
        raise ModelFileError(f"{path}: not a readable .npz of plain arrays "
                             f"({type(e).__name__}: {e})") from None


def _check(path, name, a, ndim, kinds):
    """Raise ModelFileError unless ``a`` is an ``ndim``-D array of dtype kind ``kinds``, finite if float."""
    if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in kinds:
        what = {"iu": "integer", "f": "real floating"}[kinds]
        raise ModelFileError(f"{path}: {name} must be a {ndim}-D {what} array, got "
                             f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ModelFileError(f"{path}: {name} holds non-finite values")


def read_reference(path, vocab_size=None, n_layers=None, d_model=None):
    """The reference arrays of ``path`` (.npz), validated; read without unpickling anything.

    Returns a dict with ``input_ids`` [T] (integer), ``logits`` [T, V] (finite, not all zero)
    and, if present, ``hidden_states`` [L+1, T, D] and ``context_positions`` [C] (distinct,
    in [0, T)). Other members (e.g. a fixture's ``logits_stock``) must be plain arrays whose
    size matches their header, but are never inflated. Every member is bounded by what its
    header declares, and the declared shapes must fit one another (and ``vocab_size``,
    ``n_layers``, ``d_model`` of the model, if given) before any data is inflated. Raises
    ``ModelFileError`` naming the problem (also for a reference too large to allocate).
    """
    path = Path(path)
    ref = _read_npz(path, dict(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model))
    for k in ("input_ids", "logits"):
        if k not in ref:
            raise ModelFileError(f"{path}: missing key {k!r} (keys: {sorted(ref)})")
    _check(path, "input_ids", ref["input_ids"], 1, "iu")
    _check(path, "logits", ref["logits"], 2, "f")
    ids, lg = ref["input_ids"], ref["logits"]
    if ids.shape[0] == 0 or lg.shape[0] != ids.shape[0] or lg.shape[1] == 0:
        raise ModelFileError(f"{path}: input_ids {ids.shape} and logits {lg.shape} do not fit [T], [T, V]")
    if not np.any(lg):
        raise ModelFileError(f"{path}: logits are all zero: no scale to measure relative errors")
    hs = ref.get("hidden_states")
    if hs is not None:
        _check(path, "hidden_states", hs, 3, "f")
        if hs.shape[0] == 0 or hs.shape[1] != ids.shape[0] or hs.shape[2] == 0:
            raise ModelFileError(f"{path}: hidden_states {hs.shape} is not [L+1, T, D] with T = {ids.shape[0]}")
        zero = [i for i in range(hs.shape[0]) if not np.any(hs[i])]
        if zero:
            raise ModelFileError(f"{path}: hidden_states[{zero[0]}] is all zero: no scale for relative errors")
    cp = ref.get("context_positions")
    if cp is not None:
        _check(path, "context_positions", cp, 1, "iu")
        if cp.size and (cp.min() < 0 or cp.max() >= ids.shape[0]):
            raise ModelFileError(f"{path}: context_positions must lie in [0, {ids.shape[0]}), got "
                                 f"[{cp.min()}, {cp.max()}]")
        if np.unique(cp).size != cp.size:
            raise ModelFileError(f"{path}: context_positions contain duplicates")
    return ref


def audit(path, reference, rtol=1e-9, dtype="float64", method="auto", window_by="position"):
    """Run the audit; returns the result dict with the keys of ``KEYS`` (and a few more)."""
    from . import load
    from .absorb import absorb, patched_forward
    from .backend import to_numpy

    model = load(path, dtype=dtype)   # first: the reference's shapes are bounded by the model's
    ref = read_reference(reference, model.cfg.vocab_size, model.cfg.n_layers, model.cfg.d_model)
    ids = ref["input_ids"].astype(np.int64)
    if ref["logits"].shape[1] != model.cfg.vocab_size:
        raise ModelFileError(f"reference has {ref['logits'].shape[1]} logits per token, the model "
                             f"{model.cfg.vocab_size}")
    tr = {}
    logits = to_numpy(model.forward(ids, trace=tr))
    want = ref["logits"].astype(np.float64)
    out = {"arch": model.cfg.family, "path": str(path), "dtype": str(dtype), "rtol": rtol,
           "logits_max_abs_err": float(np.max(np.abs(logits - want))),
           "logits_max_rel_err": _rel(logits, want), "first_divergent_layer": None,
           "hidden_state_rel_errs": None, "absorb_max_rel_err_self": None,
           "absorb_max_rel_err_reference": None, "unpatched_max_rel_err": None}
    hs = ref.get("hidden_states")
    if hs is not None:
        if hs.shape[0] != model.cfg.n_layers + 1 or hs.shape[2] != model.cfg.d_model:
            raise ModelFileError(f"reference hidden_states {hs.shape} do not fit the model: [L+1, T, D] = "
                                 f"[{model.cfg.n_layers + 1}, {ids.shape[0]}, {model.cfg.d_model}]")
        errs = [_rel(to_numpy(ours), h.astype(np.float64)) for ours, h in zip(tr["hidden_states"], hs)]
        out["hidden_state_rel_errs"] = errs
        bad = [i for i, e in enumerate(errs) if e > rtol]
        out["first_divergent_layer"] = bad[0] if bad else None
    ok = out["logits_max_rel_err"] <= rtol and out["first_divergent_layer"] is None
    if "context_positions" in ref:
        res = absorb(model, ids, ref["context_positions"], method=method, window_by=window_by)
        patched = to_numpy(patched_forward(model, ids, res, window_by=window_by))
        unpatched = to_numpy(model.forward(ids[res.kept], positions=res.kept, window_by=window_by))
        out["kept_positions"] = res.kept.tolist()
        out["methods"] = list(res.methods)
        out["absorb_max_rel_err_self"] = _rel(patched, logits[res.kept])
        out["absorb_max_rel_err_reference"] = _rel(patched, want[res.kept])
        out["unpatched_max_rel_err"] = _rel(unpatched, want[res.kept])
        ok = ok and out["absorb_max_rel_err_self"] <= rtol and out["absorb_max_rel_err_reference"] <= rtol
    out["ok"] = bool(ok)
    return out


def _where(i, n):
    """What hidden_states[i] of n entries is, in the HF layout."""
    return "embeddings" if i == 0 else "after the final norm" if i == n - 1 else f"output of decoder layer {i - 1}"


def format_report(r):
    """The audit result ``r`` as a short human-readable report (str)."""
    f = lambda v: "-" if v is None else (f"{v:.3e}" if isinstance(v, float) else str(v))
    lines = [f"audit of {r['path']} ({r['arch']}, {r['dtype']}, rtol {r['rtol']:g})",
             f"  logits: max abs err {f(r['logits_max_abs_err'])}, max rel err {f(r['logits_max_rel_err'])}"]
    errs = r["hidden_state_rel_errs"]
    if errs is not None:
        lines.append("  hidden states (rel err): " + " ".join(f"{i}:{e:.1e}" for i, e in enumerate(errs)))
        fd = r["first_divergent_layer"]
        lines.append("  first divergent layer: " + ("none" if fd is None else f"{fd} ({_where(fd, len(errs))})"))
    if r["absorb_max_rel_err_self"] is not None:
        lines.append(f"  theorem at kept positions {r['kept_positions']} ({'/'.join(sorted(set(r['methods'])))}):")
        lines.append(f"    patched vs our with-context logits: {f(r['absorb_max_rel_err_self'])}")
        lines.append(f"    patched vs reference logits:        {f(r['absorb_max_rel_err_reference'])}")
        lines.append(f"    unpatched vs reference (control):   {f(r['unpatched_max_rel_err'])}")
    lines.append("  OK" if r["ok"] else "  NOT OK")
    return "\n".join(lines)


def add_parser(sub):
    """Register the ``audit`` subcommand on the argparse subparsers ``sub``."""
    p = sub.add_parser("audit", help="compare a checkpoint with reference logits and check the theorem on it")
    p.add_argument("path", help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument("--reference", required=True, help=".npz with input_ids, logits[, hidden_states, context_positions]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance (default 1e-9)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--method", default="auto", help="outer witness: auto, m6a, m6b, m6c, m2, bias, one, all")
    p.add_argument("--window-by", default="position", choices=("position", "index"))
    p.set_defaults(func=run)
    return p


def run(args):
    """Run the ``audit`` subcommand: exit status 0 if ok, 1 if not ok, 2 on a bad model or reference."""
    try:
        try:
            r = audit(Path(args.path), Path(args.reference), args.rtol, args.dtype, args.method, args.window_by)
        except MemoryError:
            raise ModelFileError(f"{args.reference}: the audit of this reference needs more memory than this "
                                 "machine has; use a shorter reference") from None
    except (MinipatchError, OSError, ValueError) as e:   # bad input: exit 2, never the "not ok" code 1
        if args.json:
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        else:
            print(f"audit failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: r[k] for k in KEYS} | {"hidden_state_rel_errs": r["hidden_state_rel_errs"]}))
    else:
        print(format_report(r))
    return 0 if r["ok"] else 1
