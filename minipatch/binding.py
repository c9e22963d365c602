"""Patches bound to their origin: a :class:`~minipatch.patches.Patches` records what made it
(:func:`fingerprint`: family, config digest, dtype, a cheap parameter digest; the kept
positions; the window convention), and :func:`check_patches` refuses to apply it anywhere
else (:class:`~minipatch.errors.PatchMismatchError`), or with widths its parameters do not
have."""
from __future__ import annotations

import numpy as np

from .backend import namespace, to_numpy
from .errors import InputError, ShapeError


def check_patches(patches, model, positions, window_by="position"):
    """Refuse patches that were not made for this model, these positions and this window
    convention (:class:`~minipatch.errors.PatchMismatchError`). An
    :class:`~minipatch.absorb.AbsorbResult` is accepted for its ``.patches``."""
    from .errors import PatchMismatchError

    patches = getattr(patches, "patches", patches)
    if not hasattr(patches, "layers") or not hasattr(patches, "check"):
        raise InputError(f"patches must be a minipatch Patches (or an AbsorbResult), got {type(patches).__name__}")
    patches.check(model.cfg.n_layers, positions.shape[0])
    _check_patch_shapes(patches, model)
    if patches.positions is not None and not np.array_equal(np.asarray(patches.positions), positions):
        raise PatchMismatchError(
            f"patches were made for positions {np.asarray(patches.positions).tolist()}, "
            f"not {positions.tolist()}")
    made = getattr(patches, "origin", None)
    if made is not None:
        here = fingerprint(model)
        for key in ("family", "config", "params", "dtype"):
            if made.get(key) != here.get(key):
                raise PatchMismatchError(f"patches were made for another model ({key} differs: "
                                         f"{made.get(key)!r} vs {here.get(key)!r})")
        if made.get("window_by", window_by) != window_by:
            raise PatchMismatchError(f"patches were made with window_by={made['window_by']!r}, "
                                     f"applied with window_by={window_by!r}")


def _check_patch_shapes(patches, model):
    """Every patched parameter exists in its layer, and every factor has that parameter's widths."""
    from .patches import PATCHED_NORMS, Dense, Rank1, Scale, Shift, patch_kind_ok

    for l, lp in enumerate(patches.layers):
        params = model.params["layers"][l]
        for name, p in lp.items():
            w = params.get(name)
            if w is None:
                raise ShapeError(f"patch of layer {l} names {name!r}, which this {model.cfg.family} layer "
                                 f"does not have (patches made for another family?)")
            shape = tuple(w.shape)
            if not patch_kind_ok(name, p):
                raise InputError(f"a {type(p).__name__} patch of {name!r} in layer {l}: the forward applies "
                                 "Rank1/Dense patches to linear weights, Shift to their biases and Scale to "
                                 f"the norms {', '.join(PATCHED_NORMS)} only")
            if isinstance(p, Rank1):
                want = [("u", p.u, shape[:-1]), ("v", p.v, shape[-1:])]
            elif isinstance(p, (Shift, Dense)):
                want = [("d", p.d, shape)]
            elif isinstance(p, Scale):
                want = [("add", p.add, shape), ("mul", p.mul, (1,))]
            else:
                raise InputError(f"patch of {name!r} in layer {l} is a {type(p).__name__}, not "
                                 "Rank1/Dense/Shift/Scale")
            for field, a, tail in want:
                if a is None:
                    continue
                got = tuple(a.shape[1:])
                ok = got == tail or (field == "v" and got == shape[:-2] + tail)   # experts: v [T, E, in]
                if not ok:
                    raise ShapeError(f"patch {field} of {name!r} in layer {l} has widths {got}, the parameter "
                                     f"{tuple(shape)} needs {tail}")
                if str(a.dtype) != str(w.dtype):
                    from .errors import PatchMismatchError

                    raise PatchMismatchError(f"patch {field} of {name!r} in layer {l} is {a.dtype}, the model "
                                             f"is {w.dtype}")


def fingerprint(model):
    """What patches record about the model that made them: family, config digest, dtype and a
    cheap parameter digest (a few strided values of every parameter), cached per model."""
    fp = model.__dict__.get("_fingerprint")
    if fp is None:
        import hashlib

        cfg = hashlib.sha256(repr(model.cfg).encode()).hexdigest()[:16]
        h = hashlib.sha256()
        items = sorted((k, v) for k, v in model.params.items() if k != "layers")
        items += [(f"layers.{i}.{k}", v) for i, lp in enumerate(model.params["layers"]) for k, v in sorted(lp.items())]
        for name, a in items:
            flat = namespace(a).reshape(a, (-1,))
            stride = max(1, flat.shape[0] // 64)
            h.update(name.encode())
            h.update(np.ascontiguousarray(to_numpy(flat[::stride]), dtype=np.float64).tobytes())
        fp = {"family": model.cfg.family, "config": cfg, "params": h.hexdigest()[:16], "dtype": str(model.dtype)}
        model.__dict__["_fingerprint"] = fp
    return fp
