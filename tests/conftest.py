"""Shared test fixtures: hypothesis profiles, backends, relative-error helper, model factories."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIPATCH_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
LOCAL_FIXTURES = ROOT / "tests" / "fixtures"

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


def shared_fixture(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} not found (set MINIPATCH_SHARED)")
    return path


def _strict_backends():
    try:
        import array_api_strict as xps
    except ImportError:
        return []
    out = [pytest.param((xps, None), id="strict-cpu")]
    devs = [d for d in xps.__array_namespace_info__().devices() if str(d) != "CPU_DEVICE"]
    if devs:
        out.append(pytest.param((xps, devs[0]), id="strict-device1"))
    return out


def _cupy_backends():
    try:
        import cupy

        cupy.zeros(1)
        return [pytest.param((cupy, None), id="cupy")]
    except Exception:
        return []


BACKENDS = [pytest.param((np, None), id="numpy")] + _strict_backends() + _cupy_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(xp, device) for every available array backend: numpy, array-api-strict (CPU and
    its simulated second device, which refuses stray numpy calls as CuPy would), CuPy."""
    return request.param
