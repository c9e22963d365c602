"""Input checks shared by the forward, absorb and the loaders: named errors, never NaN."""
from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError


def host_ints(x, what):
    """A 1-D numpy int64 copy of ``x`` (list, numpy or any backend array)."""
    from .backend import to_numpy

    try:
        a = np.asarray(to_numpy(x) if not isinstance(x, (list, tuple, range)) else x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise InputError(f"{what}: cannot read as integers ({e})") from None
    if a.ndim != 1:
        raise ShapeError(f"{what} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):   # floats are refused even if whole
        raise ShapeError(f"{what} must have an integer dtype, got {a.dtype}")
    return a.astype(np.int64)


def check_tokens(tokens, vocab_size):
    t = host_ints(tokens, "tokens")
    if t.size == 0:
        raise InputError("tokens is empty")
    if t.min() < 0 or t.max() >= vocab_size:
        raise InputError(f"token ids must lie in [0, {vocab_size}), got range [{t.min()}, {t.max()}]")
    return t


def check_positions(positions, n, max_positions):
    if positions is None:
        return np.arange(n, dtype=np.int64)
    p = host_ints(positions, "positions")
    if p.shape[0] != n:
        raise ShapeError(f"positions has {p.shape[0]} entries for {n} tokens")
    if p.min() < 0 or p.max() >= max_positions:
        raise InputError(f"positions must lie in [0, {max_positions}), got [{p.min()}, {p.max()}]")
    if n > 1 and np.any(np.diff(p) <= 0):
        raise InputError("positions must be strictly increasing")
    return p


def split_context(context, n):
    """(context, kept) as sorted int64 arrays for a sequence of ``n`` tokens."""
    c = host_ints(context, "context")
    if c.size == 0:
        raise InputError("context is empty: nothing to absorb")
    if c.min() < 0 or c.max() >= n:
        raise InputError(f"context positions must lie in [0, {n}), got [{c.min()}, {c.max()}]")
    if np.unique(c).size != c.size:
        raise InputError("context positions contain duplicates")
    kept = np.setdiff1d(np.arange(n, dtype=np.int64), c)
    if kept.size == 0:
        raise InputError("context covers every position: no token is kept")
    return np.sort(c), kept


def check_choice(value, allowed, what):
    """``value`` if it is one of ``allowed`` (strings), else a named InputError listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{what} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def check_count(n, what):
    """A non-negative Python int from ``n`` (bool, float and negative values are refused)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(f"{what} must be a non-negative integer, got {n!r}")
    if n < 0:
        raise InputError(f"{what} must be a non-negative integer, got {n}")
    return int(n)


FLOAT_DTYPES = ("float32", "float64")
"""The floating dtypes a model may be loaded or cast to (``dtype=`` arguments)."""


def check_float_dtype(dtype, what="dtype"):
    """The numpy dtype named by ``dtype``: exactly ``'float32'`` or ``'float64'`` (or those numpy
    dtypes / scalar types). Anything else (``'bfloat16'``, ``'f8'``, ``3.5``, ``int``) is an
    :class:`~minipatch.errors.InputError` naming the accepted set."""
    ok = False
    if isinstance(dtype, str):
        ok = dtype in FLOAT_DTYPES
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        ok = np.dtype(dtype).name in FLOAT_DTYPES
    if not ok:
        raise InputError(f"{what} must be one of {', '.join(repr(d) for d in FLOAT_DTYPES)} "
                         f"(or numpy.float32 / numpy.float64), got {dtype!r}")
    return np.dtype(dtype)
