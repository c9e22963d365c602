"""Every MATH.md label quoted in the project resolves to a heading of MATH.md.

Labels are ``M<n>`` with an optional ``a``-``d`` (``M1``, ``M6c``), the condensation forms
``T<n>`` of section 6 (``T1``..``T5``), and section references
written ``MATH.md section N`` or ``MATH.md §N``. They are collected from the package, the tests,
the notebook sources and the README; each must name a heading of the top-level MATH.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "MATH.md"
LABEL = re.compile(r"(?<!\w)([MT])([0-9]+)([a-z]?)(?!\w)")
SECTION = re.compile(r"MATH\.md(?:'s)?,? (?:section|§) ?([0-9]+)")


def sources():
    files = sorted((ROOT / "minipatch").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    files += sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")) + [ROOT / "README.md", ROOT / "pyproject.toml"]
    return [f for f in files if f.name != Path(__file__).name]   # this file quotes bogus labels on purpose


def headings():
    return [line for line in MATH.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def quoted():
    """{label: first 'file:line' quoting it} for every M-label and section label."""
    found = {}
    for path in sources():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{i}"
            for m in LABEL.finditer(line):
                found.setdefault(m.group(0), where)
            for m in SECTION.finditer(line):
                found.setdefault(f"section {m.group(1)}", where)
    return found


def test_math_md_is_in_the_repository():
    assert MATH.is_file(), "MATH.md must be at the top level of the repository"


def test_every_quoted_label_has_a_heading():
    heads = headings()
    sections = {m.group(1) for h in heads for m in [re.match(r"#+ ([0-9]+)\.", h)] if m}
    labels = {m.group(0) for h in heads for m in LABEL.finditer(h)}
    found = quoted()
    assert len(found) >= 15, f"label scan found too little: {sorted(found)}"
    missing = {lab: where for lab, where in found.items()
               if (lab.split()[1] not in sections if lab.startswith("section") else lab not in labels)}
    assert not missing, f"labels quoted but not headings of MATH.md: {missing}"


@pytest.mark.parametrize("label", ["M1", "M2", "M3", "M4", "M5", "M6", "M6a", "M6b", "M6c", "M6d", "M7", "M8",
                                   "T1", "T2", "T3", "T4", "T5"])
def test_core_labels_are_headings(label):
    assert any(re.search(rf"(?<!\w){label}(?!\w)", h) for h in headings()), f"no heading for {label}"


def test_label_scan_negative_control():
    """The scanner sees a bogus label, and does not mistake 'Q4_K_M' or '270M' for one."""
    assert LABEL.findall("see M9 and M6e") == [("M", "9", ""), ("M", "6", "e")]
    assert LABEL.findall("Q4_K_M GGUF of Gemma 3 270M, M6a-M6d") == [("M", "6", "a"), ("M", "6", "d")]
    assert LABEL.findall("T3 and T9, not [T, D] or QT3x") == [("T", "3", ""), ("T", "9", "")]
    assert SECTION.findall("(MATH.md section 6) and MATH.md §8") == ["6", "8"]
