"""Array backend: numpy by default, any array-API library (CuPy, array-api-strict) by input.

Every hot path resolves its namespace from its inputs with :func:`namespace`, creates
new arrays with the input's dtype and device, and never calls numpy on an array it
was given. Random numbers are drawn with numpy on the host and moved with :func:`to`.
"""
from __future__ import annotations

import numpy as np



def namespace(*arrays):
    """The array-API namespace of ``arrays`` (numpy's compat wrapper for numpy arrays)."""
    from array_api_compat import array_namespace

    return array_namespace(*[a for a in arrays if a is not None and not isinstance(a, (int, float))])


def device(x):
    """The device ``x`` lives on (``'cpu'`` for numpy)."""
    from array_api_compat import device as _device

    return _device(x)


def is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def to(tree, xp=None, dev=None, dtype=None):
    """Copy a nested dict/list/tuple of arrays into namespace ``xp`` on ``dev``.

    ``xp=None`` keeps each array's namespace. ``dtype`` (a numpy dtype or a name such
    as ``'float32'``) casts floating arrays only; integer arrays keep their dtype.
    The input tree is never modified.
    """
    if isinstance(tree, dict):
        return {k: to(v, xp, dev, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to(v, xp, dev, dtype) for v in tree)
    if tree is None or isinstance(tree, (int, float, str, bool)):
        return tree
    src = namespace(tree)
    xp = xp or src
    floating = src.isdtype(tree.dtype, "real floating")
    if xp is src and dev is None and (dtype is None or not floating):
        return xp.asarray(tree, copy=True)
    host = np.asarray(to_numpy(tree))
    if dtype is not None and floating:
        host = host.astype(np.dtype(dtype) if not isinstance(dtype, str) else dtype)
    out = xp.asarray(host)
    if dev is not None:
        out = xp.asarray(out, device=dev) if _accepts_device(xp) else out
    return out


def _accepts_device(xp) -> bool:
    return xp.__name__ != "numpy"


def to_numpy(x):
    """A numpy copy of any backend array (CuPy's ``.get()``, array-api-strict via DLPack or buffer)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # CuPy
        return x.get()
    try:
        return np.asarray(x)
    except Exception:  # array-api-strict on a simulated non-CPU device refuses implicit copies
        xp = namespace(x)
        cpu = xp.asarray(x, device=xp.__array_namespace_info__().default_device())
        return np.asarray(cpu)
