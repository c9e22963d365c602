"""Helpers shared by the benchmark scripts (imported as ``from _timing import best_of``:
Python puts the script's folder, benchmarks/, first on ``sys.path``)."""
from __future__ import annotations

import json
import time
from pathlib import Path


def best_of(fns, repeats, sync=None):
    """Best wall time (s) of each callable over ``repeats`` interleaved rounds, after one warm-up.

    Round-robin (every function once per round) rather than one function ``repeats`` times
    in a row, so a burst of load from other processes hits every measurement alike.
    ``sync`` (optional) is called after each call, inside its timing: a GPU stream's
    synchronize, so that asynchronous work is counted.
    Returns (dict name -> best seconds, dict name -> result of the last call).
    """
    sync = sync or (lambda: None)
    out = {k: fn() for k, fn in fns.items()}
    sync()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def write_json(path, data):
    """Write ``data`` as indented JSON to ``path`` (parent folders made) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))
    print(f"results: {path}")
