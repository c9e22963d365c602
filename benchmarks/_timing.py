"""Timing helper shared by the benchmark scripts (imported as ``from _timing import best_of``:
Python puts the script's folder, benchmarks/, first on ``sys.path``)."""
from __future__ import annotations

import time


def best_of(fns, repeats):
    """Best wall time (s) of each callable over ``repeats`` interleaved rounds, after one warm-up.

    Round-robin (every function once per round) rather than one function ``repeats`` times
    in a row, so a burst of load from other processes hits every measurement alike.
    Returns (dict name -> best seconds, dict name -> result of the last call).
    """
    out = {k: fn() for k, fn in fns.items()}
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, out
