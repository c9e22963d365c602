"""Non-finite detection: a NaN or inf never leaves a forward, an absorb or a greedy silently.

The checks are reductions over arrays the computation already has (one ``isfinite`` per
layer output, per patch factor and per norm's mean square), so they cost O(T D) per layer
against the O(T D F) of the layer itself (measured in ``benchmarks/bench_cache.py``).

float32 overflow: a norm's mean square ``mean(x^2)`` overflows to inf long before ``x``
does (|x| ~ 1.8e19 in float32), and ``x / sqrt(inf)`` is a finite, silently wrong 0. We
detect it (:func:`check_mean_square`) and raise :class:`~minipatch.errors.NonFiniteError`
suggesting float64, rather than compute norms in an overflow-safe way: an overflow-safe
norm would make float32 agree with a model nobody runs (Hugging Face's float32 forward
overflows the same way), so refusing is the honest answer.
"""
from __future__ import annotations

import numpy as np

from .backend import namespace, to_numpy
from .errors import NonFiniteError


def quiet():
    """numpy's floating-point warnings off, for code whose results are checked right after by
    the functions below (a NaN is named there, with its layer and position, not warned about)."""
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


def all_finite(a):
    xp = namespace(a)
    return bool(xp.all(xp.isfinite(a)))


def first_row(a):
    """Index of the first token row of ``a`` holding a non-finite value."""
    bad = ~np.isfinite(to_numpy(a).reshape(a.shape[0], -1))
    return int(np.argmax(bad.any(axis=1)))


def check_values(values, layer, positions, order=("x", "a", "z", "h", "d", "m", "out")):
    """Raise NonFiniteError naming the first sublayer value (in forward order) that is not
    finite, the layer and the token's position; ``values`` maps names to [T, ...] arrays
    (MoE hiddens are dicts of them)."""
    for name in order:
        v = values.get(name)
        for arr in (v.values() if isinstance(v, dict) else (v,)):
            if arr is not None and not all_finite(arr):
                row = first_row(arr)
                hint = "the input stream is already non-finite: check the parameters" if name == "x" else ""
                raise NonFiniteError(_QUANTITY[name], layer=layer, sublayer=_SUBLAYER[name],
                                     position=int(positions[row]), hint=hint)


_QUANTITY = {"x": "layer input", "a": "attention output", "z": "MLP input", "h": "MLP hidden",
             "d": "down-projection output", "m": "MLP output", "out": "block output"}
_SUBLAYER = {"x": "input", "a": "attention", "z": "attention", "h": "mlp", "d": "mlp", "m": "mlp", "out": "mlp"}


def check_patch_finite(patch, layer, positions):
    """Raise NonFiniteError if a layer patch (dict name -> Rank1 | Shift | Scale) has a
    non-finite factor, naming the parameter, the layer and the kept token's position."""
    for name, p in patch.items():
        for field, arr in vars(p).items():
            if arr is not None and not all_finite(arr):
                raise NonFiniteError(f"patch of {name} ({field})", layer=layer, sublayer="mlp",
                                     position=int(positions[first_row(arr)]),
                                     hint="in float32 try float64; a huge scale patch means a "
                                          "near-zero normalised coordinate (try method='m6d')")




def check_mean_square(x, ms):
    """Raise NonFiniteError where a norm's mean square overflowed although ``x`` is finite."""
    xp = namespace(ms)
    if not bool(xp.all(xp.isfinite(ms))) and all_finite(x):
        raise NonFiniteError(f"mean square in a norm (overflow; first at input row {first_row(ms)})",
                             hint=f"the stream exceeds the range of {x.dtype}; use float64")
