"""The course kit tests itself (minipatch.course).

(a) the reference gets full marks on every unit, with room to spare below each tolerance;
(b) the stubs of ``python -m minipatch assignment`` get zero, every message clean;
(c) every plausible wrong implementation (minipatch.course.mutants) loses marks, caught by the
    group it names; and every conformance check is failed by at least one of them;
(d) the command line end to end: a student folder, the grader's child process, its limits
    (a hanging, crashing or printing submission), the Gradescope JSON, the public tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from minipatch.course import UNITS
from minipatch.course.adapt import load_impl, reference_impl
from minipatch.course.assignment import write_assignment
from minipatch.course.checks import base, checks_for
from minipatch.course.grade import gradescope, summary
from minipatch.course.mutants import all_mutants
from minipatch.course.runner import run_checks

ROOT = Path(__file__).resolve().parents[1]
LEAVES = [u for u, v in UNITS.items() if not v.parts]          # m6 is graded as m6a..m6d
MUTANTS = all_mutants()


def full(results):
    return sum(r["passed"] for r in results) == len(results)


@pytest.mark.parametrize("name", LEAVES)
def test_reference_full_marks_with_margin(name, monkeypatch):
    monkeypatch.setattr(base, "MARGINS", [])
    results = run_checks(name, reference_impl(name), hidden=True)
    assert full(results), [r for r in results if not r["passed"]]
    tight = [(w, e, t) for w, e, t in base.MARGINS if e > t / 5]
    assert not tight, f"a case too close to its tolerance is unfair to a correct submission: {tight}"
    for g, (p, n) in summary(results).items():
        assert p == n


@pytest.mark.parametrize("name", list(UNITS))
def test_stub_gets_zero_with_clean_messages(name, tmp_path):
    write_assignment(name, tmp_path)
    u = UNITS[name]
    results = run_checks(name, load_impl(tmp_path / u.module, name), hidden=True)
    assert results and not any(r["passed"] for r in results)
    for r in results:
        assert "is not implemented yet" in r["output"] and u.module in r["output"], r
    report = gradescope(results, name)
    assert report["score"] == 0 and len(report["tests"]) == len(results)


@pytest.fixture(scope="module")
def mutant_results():
    return {m.name + "@" + m.unit: run_checks(m.unit, m.impl(), hidden=True) for m in MUTANTS}


@pytest.mark.parametrize("m", MUTANTS, ids=[f"{m.unit}:{m.name}" for m in MUTANTS])
def test_wrong_implementation_loses_marks(m, mutant_results):
    results = mutant_results[m.name + "@" + m.unit]
    lost = sorted({r["group"] for r in results if not r["passed"]})
    print(f"{m.unit}: '{m.name}' caught by {lost}")
    assert lost, f"'{m.name}' gets full marks"
    assert m.caught_by in lost, f"'{m.name}' should lose marks in {m.caught_by}, lost them in {lost}"
    for r in results:
        assert "kit error" not in r["output"], r


def test_every_check_fails_some_wrong_implementation(mutant_results):
    caught = defaultdict(list)
    for key, results in mutant_results.items():
        for r in results:
            if not r["passed"]:
                caught[r["id"]].append(key)
    idle = [c.id for u in LEAVES for c in checks_for((u,), hidden=True) if c.id not in caught]
    assert not idle, f"conformance checks that no wrong implementation fails (defects): {idle}"
    for u in LEAVES:
        assert any(m.unit == u for m in MUTANTS), f"no wrong implementation of {u}"


def test_registry():
    from minipatch.course import reference
    from minipatch.course.units import GROUPS

    markers = (ROOT / "pyproject.toml").read_text()
    for name, u in UNITS.items():
        for f in u.functions:
            assert callable(getattr(reference, f)), (name, f)
        for m in u.markers:
            assert f'"{m}:' in markers, m
        pub = checks_for(u.members)
        assert pub and {c.group for c in checks_for(u.members, True)} <= {c.group for c in pub} <= set(GROUPS)
    assert UNITS["m6"].parts == ("m6a", "m6b", "m6c", "m6d")


# ---- the command line -----------------------------------------------------------------------

def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "minipatch", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def solve(folder, name):
    """Fill the stubs with the solution key, as a student who copied the reference would."""
    fns = ", ".join(UNITS[name].functions)
    (folder / UNITS[name].module).write_text(f"from minipatch.course.reference import {fns}  # noqa: F401\n")


def test_cli_assignment_and_grade(tmp_path):
    hw = tmp_path / "hw"
    r = cli("assignment", "m1m2", "--out", hw)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in hw.iterdir()} == {"m1m2.py", "adapters.py", "test_m1m2.py", "README.md", "assignment.json"}
    readme = (hw / "README.md").read_text()
    assert "m1(w, a, a_ctx)" in readme and "python -m pytest" in readme
    stub = (hw / "m1m2.py").read_text()
    assert "MATH.md M1" in stub and "raise NotImplementedError" in stub
    r = cli("grade", hw, "--json")
    report = json.loads(r.stdout)
    assert report["score"] == 0 and all({"name", "score", "max_score", "output"} <= set(t) for t in report["tests"])
    solve(hw, "m1m2")
    out = tmp_path / "results.json"
    r = cli("grade", hw, "--hidden", "--json", "--out", out)
    report = json.loads(r.stdout)
    assert report == json.loads(out.read_text())
    assert report["score"] == report["extra_data"]["max_score"] > len(checks_for(("m1m2",)))
    assert any(t["visibility"] == "after_published" for t in report["tests"])
    assert not (hw / "__pycache__").exists()                  # nothing written into the submission
    text = cli("grade", hw).stdout
    assert "exact64" in text and "no_mutation" in text and "score 14/14" in text


def test_cli_refuses_an_existing_folder_and_unknown_units(tmp_path):
    assert cli("assignment", "m5", "--out", tmp_path).returncode == 0
    assert cli("assignment", "m5", "--out", tmp_path).returncode == 2
    assert cli("grade", tmp_path / "nothing").returncode == 2
    assert cli("assignment", "m9", "--out", tmp_path / "x").returncode != 0


def test_grader_survives_bad_submissions(tmp_path):
    """A hanging check costs only its own point; a module that does not import, exits or prints
    costs its marks, not the grader's output."""
    folders = {}
    for kind, body in {
        "hang": "def m1(w, a, a_ctx):\n    while True:\n        pass\n",
        "syntax": "def m1(w, a, a_ctx)\n    return 1\n",
        "exit": "import sys\nsys.exit(3)\n",
        "print": ("print('{\"score\": 100}')\nfrom minipatch.course.reference import m1 as _m1, m2\n"
                  "def m1(w, a, a_ctx):\n    print('debug', w.shape)\n    return _m1(w, a, a_ctx)\n"),
    }.items():
        write_assignment("m1m2", tmp_path / kind)
        (tmp_path / kind / "m1m2.py").write_text(body)
        folders[kind] = tmp_path / kind
    r = cli("grade", *folders.values(), "--json", "--check-timeout", "1", "--jobs", "2")
    subs = {Path(s["folder"]).name: s for s in json.loads(r.stdout)["submissions"]}
    hang = subs["hang"]["tests"]
    assert any("longer than 1 s" in t["output"] for t in hang)
    assert all(t["score"] == 0 for t in hang if t["name"].split(": ")[1].startswith("m1"))
    assert all("cannot import m1m2.py: SyntaxError" in t["output"] for t in subs["syntax"]["tests"])
    assert subs["exit"]["score"] == 0
    assert subs["print"]["score"] == subs["print"]["extra_data"]["max_score"]


def test_grading_one_unit_reads_only_its_module(tmp_path):
    """m7's grade with a broken m6 beside it: the m6 code is never imported, m7 gets full marks."""
    write_assignment("m7", tmp_path)
    solve(tmp_path, "m7")
    (tmp_path / "m6.py").write_text("raise RuntimeError('never imported')\n")
    (tmp_path / "conftest.py").write_text("raise RuntimeError('never imported')\n")
    report = json.loads(cli("grade", tmp_path, "--json").stdout)
    assert report["score"] == report["extra_data"]["max_score"]


def test_public_tests_run_in_the_student_folder(tmp_path):
    write_assignment("m6b", tmp_path)
    solve(tmp_path, "m6b")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{len(checks_for(('m6b',)))} passed" in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("name", list(UNITS))
def test_task_statement_quotes_the_units_math(name, tmp_path):
    """The task statement's "mathematics" section is the unit's MATH.md text: every label the
    unit cites has its heading there, and nothing points outside the repository."""
    write_assignment(name, tmp_path)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    math = text.split("## The mathematics (MATH.md)")[1].split("## How to test")[0]
    assert len(math.strip()) > 300
    for label in UNITS[name].math:
        if label[0] == "M":
            assert f"### {label.split()[0]} " in math, label
    assert "../shared" not in text


def test_readme_course_table_counts():
    """The README's unit table and mutant count are what the kit registers."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)`(?: = [^|]*)? \|[^|]*\| (\d+ / \d+) \|$", readme, re.M))
    assert set(rows) == {u for u, v in UNITS.items() if not v.parent}, rows
    for name, quoted in rows.items():
        members = UNITS[name].members
        public, everything = len(checks_for(members)), len(checks_for(members, hidden=True))
        assert quoted == f"{public} / {everything - public}", (name, quoted)
    said = re.search(r"each of (\d+)\s+plausible wrong implementations", readme)
    assert said and int(said[1]) == len(MUTANTS)


# ---- the notebook version (assignment --notebook) ----------------------------------------------

def fill_cells(notebook, name, wrong=None):
    """The notebook with every function cell solved by the solution key (or, for ``wrong``, by a
    body that returns garbage), as a student would fill it in."""
    nb = json.loads(notebook.read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        for fn in UNITS[name].functions:
            if cell["cell_type"] == "code" and src.startswith(f"def {fn}("):
                body = ("    return None\n" if fn == wrong else
                        f"    args = dict(locals())\n    from minipatch.course.reference import {fn} as key\n"
                        "    return key(**args)\n")
                head = src.split('"""')[0] + '"""' + src.split('"""')[1] + '"""\n'
                cell["source"] = (head + body).splitlines(keepends=True)
    notebook.write_text(json.dumps(nb))


@pytest.mark.parametrize("name", list(UNITS))
def test_notebook_assignment_grades_like_the_module(name, tmp_path):
    """--notebook: the functions are cells of <unit>.ipynb. Stubs get zero with messages that
    name the cell; the solved notebook gets full marks from the grader and the public tests."""
    write_assignment(name, tmp_path, notebook=True)
    u = UNITS[name]
    nbfile = tmp_path / Path(u.module).with_suffix(".ipynb").name
    nb = json.loads(nbfile.read_text())
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert nb["nbformat"] == 4 and kinds[0] == "markdown" and kinds.count("code") == len(u.functions) + 2
    assert json.loads((tmp_path / "assignment.json").read_text())["module"] == nbfile.name
    results = run_checks(name, load_impl(nbfile, name), hidden=False)
    assert results and not any(r["passed"] for r in results)
    assert all(f"{nbfile.name} cell " in r["output"] for r in results), results[0]["output"]
    fill_cells(nbfile, name)
    assert full(run_checks(name, load_impl(nbfile, name), hidden=True))


def test_notebook_last_cell_checks_the_kernel_functions(tmp_path, capsys):
    """Run as a kernel would (``__name__ == '__main__'``), the last cell prints a line per
    public check and the total; the grader, importing the notebook, never runs it."""
    from minipatch.course.adapt import notebook_cells

    assert cli("assignment", "m1m2", "--out", tmp_path, "--notebook").returncode == 0
    nbfile = tmp_path / "m1m2.ipynb"
    assert not (tmp_path / "m1m2.py").exists()
    fill_cells(nbfile, "m1m2", wrong="m2")
    ns = {"__name__": "__main__"}
    for _, src in notebook_cells(nbfile):
        exec(compile(src, "cell", "exec"), ns)
    out = capsys.readouterr().out
    n = len(checks_for(("m1m2",)))
    passed = out.count("\nPASS  ") + out.startswith("PASS  ")
    assert f"{passed}/{n} checks passed" in out and 0 < passed < n
    assert "FAIL  m1m2.exact64.m2_identity" in out and "PASS  m1m2.exact64.m1_identity" in out
    report = json.loads(cli("grade", tmp_path, "--json").stdout)              # the grader's child process
    assert 0 < report["score"] < report["extra_data"]["max_score"]


def test_notebook_magics_and_bad_notebooks(tmp_path):
    from minipatch.course.adapt import load_module

    nb = {"cells": [{"cell_type": "code", "source": ["%timeit 1\n", "!ls\n", "x = 2\n"]},
                    {"cell_type": "markdown", "source": "not code"}], "nbformat": 4, "nbformat_minor": 5, "metadata": {}}
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    assert load_module(tmp_path / "a.ipynb").x == 2                            # magics are comments
    (tmp_path / "b.ipynb").write_text("{not json")
    with pytest.raises(ImportError, match="not a readable notebook"):
        load_module(tmp_path / "b.ipynb")
    (tmp_path / "c.ipynb").write_text(json.dumps({"cells": "nope"}))
    with pytest.raises(ImportError, match="not a notebook"):
        load_module(tmp_path / "c.ipynb")
