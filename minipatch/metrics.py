"""The error measure every comparison in minipatch quotes (MATH.md section 8).

    rel_err(a, b) = max |a - b| / max |b|

computed in float64 on host copies (any backend), relative to the largest reference entry
rather than entrywise, so that tiny reference entries do not dominate.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy


def rel_err(a, b):
    """max |a - b| / max |b| in float64; where ``b`` is all zero (or empty), the absolute
    max |a - b| (0.0 for equal arrays). ``a`` and ``b`` broadcast (numpy rules)."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    diff = float(np.max(np.abs(a - b), initial=0.0))
    scale = float(np.max(np.abs(b), initial=0.0))
    return diff / scale if scale > 0 else diff
