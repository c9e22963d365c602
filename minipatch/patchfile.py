"""Patches as files: the ``.npz`` layout of FORMATS.md ("Patch files"), written and read safely.

One member per array (plain arrays only; read with :func:`minipatch.npzfile.read_npz`, never
unpickled):

  format                       text 'minipatch-patches/1' (optional when reading)
  n_layers                     int, 0-d: L
  kept                         int [T_K], strictly increasing: the positions the patches are for
  context                      int [T_C] (optional): the absorbed positions (disjoint from kept)
  window_by                    text 'position' | 'index' (optional, default 'position')
  input_ids                    int [T] (optional): the with-context tokens
  methods                      text [L] (optional): each layer's construction ('m6a', 'm2', ...)
  origin.<key>                 text (optional): what made them (minipatch's model fingerprint)
  layers.<l>.<param>.u, .v     rank-1 weight patch per token: u [T_K, out], v [T_K, in]
                               (experts: u [T_K, E, out], v [T_K, in] or [T_K, E, in])
  layers.<l>.<param>.dense     dense weight delta per token [T_K, out, in] (or [T_K, E, out, in])
  layers.<l>.<param>.shift     bias shift per token [T_K, out]
  layers.<l>.<param>.add, .mul norm multiplier s -> (s + add) * mul: add [T_K, D], mul [T_K, 1]

``<param>`` is minipatch's parameter name in the layer (``down_proj.weight``,
``mlp_post_norm.weight``; the error for an unknown one lists the model's). Floating members
share one dtype and are finite.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import ModelFileError
from .npzfile import check_array, read_npz, text, write_npz
from .patches import Dense, Patches, Rank1, Scale, Shift

FORMAT = "minipatch-patches/1"
TOP = ("format", "n_layers", "kept", "context", "window_by", "input_ids", "methods")
FIELDS = {"u": Rank1, "v": Rank1, "dense": Dense, "shift": Shift, "add": Scale, "mul": Scale}
MEMBER = re.compile(r"^layers\.(\d{1,6})\.([A-Za-z_][A-Za-z0-9_.]*\.(?:weight|bias))\.(u|v|dense|shift|add|mul)$")
ORIGIN = re.compile(r"^origin\.[a-z_]{1,32}$")


class LoadedPatches(tuple):
    """(patches, context, window_by, input_ids, dtype) of a patch file, with those names."""

    patches = property(lambda s: s[0])
    context = property(lambda s: s[1])
    window_by = property(lambda s: s[2])
    input_ids = property(lambda s: s[3])
    dtype = property(lambda s: s[4])


def _fields(p):
    if isinstance(p, Rank1):
        return {"u": p.u, "v": p.v}
    if isinstance(p, Dense):
        return {"dense": p.d}
    if isinstance(p, Shift):
        return {"shift": p.d}
    return {k: a for k, a in (("add", p.add), ("mul", p.mul)) if a is not None}


def cast_patches(patches, dtype):
    """The patches with every array cast to ``dtype`` (numpy; exact from float32 to float64)."""
    from .backend import to_numpy

    def conv(p):
        return type(p)(*[None if a is None else np.asarray(to_numpy(a)).astype(dtype) for a in vars(p).values()])

    return Patches(tuple({k: conv(p) for k, p in lp.items()} for lp in patches.layers), patches.positions,
                   patches.methods, patches.origin)


def save_patches(patches, path, context=None, input_ids=None, window_by=None):
    """Write ``patches`` (a :class:`~minipatch.patches.Patches` or an AbsorbResult) to ``path``.

    ``context`` defaults to the AbsorbResult's; ``window_by`` to the patches' origin (else
    'position'). Returns the path.
    """
    from .backend import to_numpy

    if context is None:
        context = getattr(patches, "context", None)
    patches = getattr(patches, "patches", patches)
    origin = patches.origin or {}
    arrays = {"format": np.array(FORMAT), "n_layers": np.array(len(patches.layers), dtype=np.int64),
              "kept": np.asarray(patches.positions, dtype=np.int64),
              "window_by": np.array(window_by or origin.get("window_by", "position"))}
    if context is not None:
        arrays["context"] = np.asarray(context, dtype=np.int64)
    if input_ids is not None:
        arrays["input_ids"] = np.asarray(input_ids, dtype=np.int64)
    if patches.methods:
        arrays["methods"] = np.array([str(m) for m in patches.methods])
    for k, v in origin.items():
        arrays[f"origin.{k}"] = np.array(str(v))
    for l, lp in enumerate(patches.layers):
        for name, p in lp.items():
            for field, a in _fields(p).items():
                arrays[f"layers.{l}.{name}.{field}"] = to_numpy(a)
    return write_npz(Path(path), arrays)


def _parse_names(path, names):
    """{(layer, param): {field: member}} of the per-layer members; unknown names are refused."""
    found = {}
    for k in names:
        if k in TOP or ORIGIN.match(k):
            continue
        m = MEMBER.match(k)
        if not m:
            raise ModelFileError(f"{path}: member {k!r} is not part of a patch file (FORMATS.md: "
                                 "layers.<l>.<param>.<u|v|dense|shift|add|mul> or a top-level key)")
        found.setdefault((int(m[1]), m[2]), {})[m[3]] = k
    for (l, name), fields in found.items():
        kinds = {FIELDS[f] for f in fields}
        if len(kinds) != 1 or (kinds == {Rank1} and set(fields) != {"u", "v"}):
            raise ModelFileError(f"{path}: layer {l} {name!r} has fields {sorted(fields)}; one of u+v, dense, "
                                 "shift, add/mul")
    return found


def _bound(path, headers, model):
    """Before inflating: T_K from ``kept``, every per-layer member [T_K, ...] and, with a model,
    its layer index, parameter name and widths."""
    kept = headers.get("kept")
    if kept is None or len(kept[0]) != 1:
        raise ModelFileError(f"{path}: needs a 1-D 'kept' member (the positions the patches are for)")
    T = kept[0][0]
    params = None if model is None else model.params["layers"]
    for (l, name), fields in _parse_names(path, headers).items():
        if params is not None and l >= len(params):
            raise ModelFileError(f"{path}: patches for layer {l}; the model has {len(params)} layers")
        w = None if params is None else params[l].get(name)
        if params is not None and w is None:
            raise ModelFileError(f"{path}: layer {l} has no parameter {name!r}; this {model.cfg.family} layer has "
                                 f"{', '.join(sorted(params[l]))}")
        for field, member in fields.items():
            shape = headers[member][0]
            if not shape or shape[0] != T:
                raise ModelFileError(f"{path}: {member} {shape} is not [T_K, ...] with T_K = {T} (len(kept))")
            if w is not None:
                want = {"u": w.shape[:-1], "v": w.shape[-1:], "dense": w.shape, "shift": w.shape,
                        "add": w.shape, "mul": (1,)}[field]
                ok = tuple(shape[1:]) == tuple(want) or (field == "v" and tuple(shape[1:]) == tuple(w.shape[:-2]) +
                                                         tuple(want))
                if not ok:
                    raise ModelFileError(f"{path}: {member} {shape} does not fit the parameter {name} "
                                         f"{tuple(w.shape)}: need [T_K, {', '.join(map(str, want))}]")


def _positions(path, name, a, n=None):
    check_array(path, name, a, 1, "iu")
    if a.size and (a.min() < 0 or (n is not None and a.max() >= n)):
        raise ModelFileError(f"{path}: {name} must lie in [0, {n if n is not None else 'inf'}), "
                             f"got [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


def load_patches(path, model=None):
    """Read a patch file; returns a :class:`LoadedPatches` (patches, context, window_by, input_ids,
    dtype). Nothing is unpickled; with ``model`` every member's declared shape is checked against
    the model's parameters before any data is read, and the layer count must be the model's.

    Raises:
      ModelFileError naming the member: unknown members, mixed or missing fields, wrong shapes,
      non-finite or non-floating values, positions that are not strictly increasing, context
      overlapping the kept positions, a layer count that is not the model's.
    """
    path = Path(path)
    z = read_npz(path, lambda k: True, "patch file", lambda p, h: _bound(p, h, model))
    if "format" in z and text(path, "format", z["format"]) != FORMAT:
        raise ModelFileError(f"{path}: format {text(path, 'format', z['format'])!r}, expected {FORMAT!r}")
    if "n_layers" not in z:
        raise ModelFileError(f"{path}: missing 'n_layers' (the model's layer count)")
    check_array(path, "n_layers", z["n_layers"], 0, "iu")
    L = int(z["n_layers"])
    if model is not None and L != model.cfg.n_layers:
        raise ModelFileError(f"{path}: patches for {L} layers, the model has {model.cfg.n_layers}")
    kept = _positions(path, "kept", z["kept"])
    if kept.size == 0 or np.any(np.diff(kept) <= 0):
        raise ModelFileError(f"{path}: kept must be non-empty and strictly increasing, got {kept.tolist()}")
    context = _positions(path, "context", z["context"]) if "context" in z else None
    if context is not None and (np.unique(context).size != context.size or np.intersect1d(context, kept).size):
        raise ModelFileError(f"{path}: context must be distinct positions disjoint from kept")
    window_by = text(path, "window_by", z["window_by"]) if "window_by" in z else "position"
    if window_by not in ("position", "index"):
        raise ModelFileError(f"{path}: window_by must be 'position' or 'index', got {window_by!r}")
    ids = _positions(path, "input_ids", z["input_ids"]) if "input_ids" in z else None
    methods = ()
    if "methods" in z:
        check_array(path, "methods", z["methods"], 1, "U")
        methods = tuple(str(m) for m in z["methods"])
    origin = {k[7:]: text(path, k, a) for k, a in z.items() if ORIGIN.match(k)} or None
    layers, dtypes = [dict() for _ in range(L)], set()
    for (l, name), fields in sorted(_parse_names(path, z).items()):
        if l >= L:
            raise ModelFileError(f"{path}: member of layer {l}, but n_layers is {L}")
        arrays = {}
        for f, member in fields.items():
            check_array(path, member, z[member], z[member].ndim, "f")
            arrays[f] = z[member]
            dtypes.add(z[member].dtype)
        cls = FIELDS[next(iter(fields))]
        layers[l][name] = (Rank1(arrays["u"], arrays["v"]) if cls is Rank1 else cls(arrays.get("dense", arrays.get(
            "shift"))) if cls in (Dense, Shift) else Scale(arrays.get("add"), arrays.get("mul")))
    if len(dtypes) > 1:
        raise ModelFileError(f"{path}: floating members mix dtypes {sorted(map(str, dtypes))}")
    patches = Patches(tuple(layers), kept, methods, origin)
    return LoadedPatches((patches, context, window_by, ids, (dtypes or {None}).pop()))
