"""The README section "Prompts into weights" prints what the study's JSON holds.

``figures/icl_study.json`` is written by ``python -m minipatch icl-tasks --json
figures/icl_study.json`` (about half an hour on two cores); the README's tables are
``python -m minipatch icl-tasks --tables figures/icl_study.json``, verbatim, and every number its
prose quotes is checked here against the JSON, within one significant digit."""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest

from helpers import ROOT, number_agrees
from minipatch import icl_report
from minipatch.__main__ import main
from minipatch.condense_study import StudyConfig

README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = ROOT / "figures" / "icl_study.json"

pytestmark = pytest.mark.thought


@pytest.fixture(scope="module")
def result():
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def section():
    start = README.index("## Prompts into weights")
    end = README.index("\n## ", start + 10)
    return README[start:end]


def test_committed_results_are_the_full_study(result):
    full = json.loads(json.dumps(StudyConfig().__dict__))
    assert result["config"] == full
    assert len(result["tasks"]) == 9 and all(len(t["seeds"]) == 3 for t in result["tasks"].values())
    assert (ROOT / "figures" / "icl_study.png").is_file()


def test_readme_tables_are_generated_from_the_json(result):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["icl-tasks", "--tables", str(RESULTS)]) == 0
    printed = out.getvalue()
    assert printed == icl_report.tables(result)
    assert printed.strip() in section(), "README tables differ: python -m minipatch icl-tasks --tables figures/icl_study.json"


def quoted(key):
    """The number the README section quotes after ``key`` (e.g. 'float32 relative error ')."""
    m = re.search(re.escape(key) + r"\s*([0-9.]+(?:e[-+]?[0-9]+)?)", " ".join(section().split()))
    assert m, f"README section does not quote {key!r}"
    return m.group(1)


def test_exactness_numbers(result):
    s = icl_report.summary(result)
    learned = [r for r in s.values() if "methods" in r]
    m7 = max(r["m7_rel_err"] for r in learned)
    control = min(r["m7_unpatched_rel_err"] for r in learned)
    t2 = max(r["lstsq_max_rel_residual"] for r in learned)
    assert m7 < 1e-4 and control > 1e-2 and t2 < 1e-10
    assert number_agrees(quoted("patched run without the demonstrations reproduces the 10-shot stream to"), f"{m7:.1e}")
    assert number_agrees(quoted("without the patches"), f"{control:.2f}")
    assert number_agrees(quoted("worst relative residual over every weight, size and seed"), f"{t2:.1e}")


def test_learned_tasks(result):
    s = icl_report.summary(result)
    gains = {t: r["gain"] for t, r in s.items()}
    assert {t for t, g in gains.items() if g >= 0.2} == {t for t, r in s.items() if "methods" in r}
    assert np.isfinite(list(gains.values())).all()


def test_prose_numbers_come_from_the_tables(result):
    """Every number in "What the numbers say" is one the generated tables print (to one significant
    digit), or a count of the protocol (layers, sizes, widths)."""
    from helpers import NUMBER

    text = section()
    bullets = text[text.index("What the numbers say:"):text.index("Exactness, where")]
    printed = NUMBER.findall(icl_report.tables(result))
    protocol = {"1", "4", "9", "10", "11", "12", "15", "16", "64", "640"}
    for num in NUMBER.findall(bullets):
        assert num in protocol or any(number_agrees(num, p) for p in printed if "." in p or num.isdigit()), num
