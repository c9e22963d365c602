"""Connecting an implementation to the checks: loading it, reading its return values, and
injecting it into the spine.

- :func:`load_module`: a student's module (or notebook) imported from its path (nothing else
  of the folder is imported or executed; no bytecode is written there).
- :class:`Impl`: the unit's functions of a module (a missing one raises
  :class:`MissingFunction` when called). :func:`reference_impl`: the solution key.
- :func:`as_rank1`, :func:`as_m6`, ...: the accepted return conventions, turned into the
  spine's patch types, with :class:`ReturnValueError` naming what was wrong.
- :func:`injected`: for the duration of a ``with``, the spine calls the implementation's
  functions where it would call its own (only the graded unit's; the checks that go through
  the spine use it), so a wrong M6 can only fail M6's checks, never M7's.
"""
from __future__ import annotations

import __future__
import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

from ..errors import MinipatchError
from ..patches import Rank1, Scale
from . import reference
from .units import unit as get_unit


class MissingFunction(MinipatchError):
    """The submission has no function of that name."""


class ReturnValueError(MinipatchError):
    """A function returned something that is not one of the accepted conventions."""


class Dense:
    """A per-token dense weight patch dW [T, out, in] with the spine's patch interface."""

    def __init__(self, d):
        self.d = d

    def apply(self, x, y):
        return y + (self.d @ x[..., :, None])[..., 0]

    def dense(self, t):
        return self.d[t, ...]

    @property
    def n_tokens(self):
        return self.d.shape[0]


def _is_array(x):
    return hasattr(x, "shape") and hasattr(x, "dtype")


def as_rank1(r, where):
    """(u, v), a dense [T, out, in] or a Rank1 -> Rank1 / Dense."""
    if isinstance(r, (Rank1, Dense)):
        return r
    if isinstance(r, (tuple, list)) and len(r) == 2 and all(_is_array(x) for x in r):
        u, v = r
        if u.shape[:1] != v.shape[:1]:
            raise ReturnValueError(f"{where}: u {tuple(u.shape)} and v {tuple(v.shape)} need one row per token")
        return Rank1(u, v)
    if _is_array(r) and r.ndim == 3:
        return Dense(r)
    raise ReturnValueError(f"{where} must return (u, v) arrays or a dense [T, out, in], got {_describe(r)}")


def as_m6(r, where):
    """(down, add, mul) or an M6Patch -> M6Patch(Rank1 | None, Scale)."""
    from ..m6 import M6Patch

    if isinstance(r, M6Patch):
        return r
    if not (isinstance(r, (tuple, list)) and len(r) == 3):
        raise ReturnValueError(f"{where} must return (down, add, mul), got {_describe(r)}")
    down, add, mul = r
    if add is None and mul is None:
        raise ReturnValueError(f"{where}: add and mul are both None (the post-norm scale is never patched)")
    for name, x in (("add", add), ("mul", mul)):
        if x is not None and not _is_array(x):
            raise ReturnValueError(f"{where}: {name} must be an array or None, got {_describe(x)}")
    return M6Patch(None if down is None else as_rank1(down, where + " (down)"), Scale(add, mul))


def as_array(r, where, attr=None):
    """An array (or the ``attr`` field of a spine result object)."""
    if attr is not None and hasattr(r, attr):
        r = getattr(r, attr)
    if not _is_array(r):
        raise ReturnValueError(f"{where} must return an array, got {_describe(r)}")
    return r


def as_steps(r, w, a, where):
    """(u, v, lr) or a Steps -> Steps."""
    from ..dynamics import Steps

    if isinstance(r, Steps):
        return r
    if not (isinstance(r, (tuple, list)) and len(r) == 3):
        raise ReturnValueError(f"{where} must return (u, v, lr), got {_describe(r)}")
    u, v, lr = r
    return Steps(w, a, as_array(u, where + " (u)"), as_array(v, where + " (v)"), np.asarray(lr))


def as_patch_dict(r, where):
    """dict name -> rank-1 patch (any accepted convention) -> dict name -> Rank1 / Dense."""
    if not isinstance(r, dict):
        raise ReturnValueError(f"{where} must return a dict name -> (u, v), got {_describe(r)}")
    return {k: as_rank1(v, f"{where}[{k!r}]") for k, v in r.items()}


def _describe(x):
    if _is_array(x):
        return f"an array of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} items"
    return repr(x)[:60] if x is None or isinstance(x, (int, float, str)) else type(x).__name__


# ---- implementations ------------------------------------------------------------------------

class Impl:
    """The unit's functions of a module. Attributes: one per function name; ``source``."""

    def __init__(self, functions, source):
        self.source = source
        self.names = tuple(functions)
        for name, fn in functions.items():
            setattr(self, name, fn)

    @property
    def is_reference(self):
        return self.source == "reference"


def _missing(name, source):
    def fn(*args, **kw):
        raise MissingFunction(f"{source} has no function {name!r}")
    return fn


def impl_of(module, names, source):
    fns = {}
    for name in names:
        fn = getattr(module, name, None)
        fns[name] = fn if callable(fn) else _missing(name, source)
    return Impl(fns, source)


def reference_impl(unit_name):
    """The solution key's functions for a unit."""
    u = get_unit(unit_name)
    return Impl({n: getattr(reference, n) for n in u.functions}, "reference")


def notebook_cells(path):
    """The code cells of a Jupyter notebook file as (cell number, counting every cell from 1,
    source text): the JSON is read, nothing is run. IPython magics and shell lines (``%...``,
    ``!...``) become comments."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ImportError(f"{Path(path).name} is not a readable notebook: {e}") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list):
        raise ImportError(f"{Path(path).name} is not a notebook (no list of cells)")
    out = []
    for k, c in enumerate(cells, 1):
        if isinstance(c, dict) and c.get("cell_type") == "code":
            src = c.get("source", "")
            src = "".join(map(str, src)) if isinstance(src, list) else str(src)
            out.append((k, "\n".join("# " + ln if ln.lstrip().startswith(("%", "!")) else ln
                                      for ln in src.splitlines())))
    return out


def load_module(path, name=None):
    """Import one Python file by path, without adding its folder to ``sys.path`` and without
    writing bytecode next to it. Its own imports resolve as usual (numpy, minipatch).

    A notebook (``.ipynb``) is imported as the module its code cells make, run in order, each
    compiled under the name ``'<file> cell <k>'`` (so errors name the cell). A cell guarded by
    ``if __name__ == "__main__":`` runs in the notebook's kernel but not here.
    """
    path = Path(path).resolve()
    name = name or f"_minipatch_submission_{abs(hash(str(path)))}"
    if path.suffix == ".ipynb":
        mod = types.ModuleType(name)
        mod.__file__ = str(path)
        sys.modules[name] = mod
        flags = __future__.annotations.compiler_flag
        for k, src in notebook_cells(path):
            exec(compile(src, f"{path.name} cell {k}", "exec", flags=flags, dont_inherit=True), mod.__dict__)
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    old = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = old
    return mod


def load_impl(path, unit_name):
    """The unit's functions of the module at ``path``."""
    return impl_of(load_module(path), get_unit(unit_name).functions, Path(path).name)


# ---- injection into the spine ---------------------------------------------------------------

def _m6_adapter(fn, name):
    def construction(s, eps, h_ctx, m_ctx, delta):
        return as_m6(fn(s, eps, h_ctx, m_ctx, delta), name)
    return construction


def _replacements(unit_name, impl):
    """(object, attribute or key, new value) for every spine binding the unit replaces."""
    from .. import controllability, dynamics, experts, m6
    from ..blocks import base

    out = []
    if unit_name in ("m6a", "m6b", "m6c", "m6d"):
        fn = _m6_adapter(getattr(impl, unit_name), unit_name)
        out += [(m6.CONSTRUCTIONS, unit_name, fn), (m6, unit_name, fn)]
    elif unit_name == "m5":
        def steps(w, a):
            return as_steps(impl.implicit_steps(w, a), w, a, "implicit_steps")
        out.append((dynamics, "implicit_steps", steps))
    elif unit_name == "m8":
        def inner(weights, n, n_ctx):
            return as_patch_dict(impl.inner_witness(weights, n, n_ctx), "inner_witness")

        def outer(self, p, h, delta, cfg, method="auto"):
            method = "one" if method == "auto" else method
            r = impl.moe_outer_witness(h["gates"], h["experts"], delta, method)
            return "moe-" + method, {"experts.down_proj.weight": as_rank1(r, "moe_outer_witness")}

        def theorem(inner_part, outer_part, p, cfg, z, z_ctx, h_ctx=None, delta=None, method="auto"):
            controllability.check_method(outer_part, cfg, method)
            used = []

            def ow(h, d):
                name, patch = outer_part.witness(p, h, d, cfg, method)
                used.append(name)
                return patch
            patch = impl.m8(lambda a, b: inner_part.witness(p, a, b, cfg), ow,
                            lambda x: inner_part.forward(p, x, cfg), z, z_ctx, delta)
            if not isinstance(patch, dict):
                raise ReturnValueError(f"m8 must return a dict, got {_describe(patch)}")
            return (used[-1] if used else "none"), patch
        out += [(controllability, "inner_witness", inner), (experts.MoEOuter, "witness", outer),
                (base, "m8", theorem)]
    return out


@contextlib.contextmanager
def injected(unit_name, impl):
    """Within the block the spine uses ``impl``'s functions for ``unit_name`` (a no-op for the
    reference and for units the checks call directly)."""
    reps = [] if impl.is_reference else _replacements(unit_name, impl)
    saved = []
    try:
        for obj, key, new in reps:
            if isinstance(obj, dict):
                saved.append((obj, key, obj[key]))
                obj[key] = new
            else:
                saved.append((obj, key, obj.__dict__[key] if isinstance(obj, type) else getattr(obj, key)))
                setattr(obj, key, new)
        yield impl
    finally:
        for obj, key, old in reversed(saved):
            if isinstance(obj, dict):
                obj[key] = old
            else:
                setattr(obj, key, old)


__all__ = ["Impl", "Dense", "MissingFunction", "ReturnValueError", "as_rank1", "as_m6", "as_array",
           "as_steps", "as_patch_dict", "impl_of", "reference_impl", "load_module", "load_impl", "injected"]
