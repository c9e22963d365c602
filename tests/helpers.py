"""Plain helpers shared by the test modules (no pytest fixtures here: those are in conftest.py).

Test modules import from this file (``from helpers import rel_err``), never from each other.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Tolerances (MATH.md section 8): relative to max |reference|.
TOL64_BLOCK = 1e-12
TOL64_MODEL = 1e-10
TOL32 = 1e-4
CONTROL_MIN = 1e-3   # negative control: without patches the error must be at least this


def rel_err(a, b):
    """max |a - b| / max |b| on numpy copies (any backend)."""
    from minipatch.backend import to_numpy

    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def fixture(name):
    """Path of ``tests/fixtures/<name>`` (a folder or a file). The fixtures are part of the
    repository, so a missing one is an error, never a skip."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"fixture {path} is missing from the repository (see tests/fixtures/README.md)")
    return path


def load_npz(path):
    """{key: array} of an .npz of plain arrays (never unpickled)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
