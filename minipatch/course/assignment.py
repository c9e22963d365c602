"""``python -m minipatch assignment UNIT --out DIR``: a student folder for one unit.

DIR/<unit>.py        the functions to write: signature, docstring (formula, MATH.md label), a
                     ``raise NotImplementedError`` body (from :mod:`minipatch.course.reference`)
                     (with ``--notebook``: DIR/<unit>.ipynb, the task statement and one cell per
                     function, then a cell that runs the public checks)
DIR/adapters.py      the one file that connects that module to the tests (the CS336 pattern)
DIR/test_<unit>.py   the public conformance checks (``python -m pytest -q`` in DIR)
DIR/README.md        the task statement: what to implement, the MATH.md excerpt, how to test
DIR/assignment.json  which unit and module, for the grader (data only, never executed)
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from .. import __version__
from ..errors import InputError
from . import reference
from .checks import checks_for
from .units import GROUP_TITLES, unit as get_unit

IMPORTS = {
    "m1m2": ["import numpy as np", "", "from minipatch.errors import NotControllableError"],
    "m3m4": ["import numpy as np", "", "from minipatch.errors import NotControllableError"],
    "m5": ["import numpy as np", "", "from minipatch.errors import InputError, NotControllableError, ShapeError"],
    "m6": ["import numpy as np", "", "from minipatch.errors import NotControllableError",
           "from minipatch.ops import rms_unit   # x / sqrt(mean(x^2) + eps) over the last axis"],
    "m7": ["import numpy as np"],
    "m8": ["import numpy as np", "", "from minipatch.errors import MethodError, NotControllableError",
           "from minipatch.patches import Rank1   # the spine's patch type: Rank1(u, v)"],
    "thought": ["import warnings", "", "import numpy as np", "",
                "from minipatch.errors import InputError, ShapeError",
                "from minipatch.thought import RankDeficientWarning"],
}

# MATH.md quoted in each task statement: (labels whose "### <label>" subsections are quoted,
# sections whose preamble, up to their first subsection, is quoted; a section without labels
# is quoted whole)
EXCERPTS = {
    "m1m2": (["M1", "M2", "Properties of M1 and M2"], []), "m3m4": (["M3", "M4"], []),
    "m5": (["M5", "M5 through a model"], []),
    "m6": (["M6", "M6a", "M6b", "M6c", "M6c with exact zeros", "M6d"], ["## 3."]),
    "m6a": (["M6", "M6a"], ["## 3."]), "m6b": (["M6", "M6b"], ["## 3."]),
    "m6c": (["M6", "M6c", "M6c with exact zeros"], ["## 3."]), "m6d": (["M6", "M6d"], ["## 3."]),
    "m7": ([], ["## 4."]), "m8": ([], ["## 5."]), "thought": ([], ["## 6."]),
}


def math_md():
    """The text of the repository's MATH.md ($MINIPATCH_MATH overrides); None if absent (an
    installed copy without the repository)."""
    root = Path(__file__).resolve().parents[2]
    for p in (os.environ.get("MINIPATCH_MATH"), root / "MATH.md"):
        if p and Path(p).is_file():
            return Path(p).read_text(encoding="utf-8")
    return None


def _blocks(text):
    """MATH.md split at its headings: [(heading line or '', body lines)]."""
    out = [("", [])]
    for line in text.splitlines():
        if line.startswith("#"):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return out


def excerpt(text, labels, sections):
    """The MATH.md text a unit quotes: each section in ``sections`` (heading prefix such as
    '## 3.': its preamble when ``labels`` are given, else the whole section) and each
    subsection '### <label>' or '### <label> ...' of ``labels`` (the first that matches), in
    MATH.md's order."""
    blocks = _blocks(text)
    keep = set()
    for head in sections:
        start = next((i for i, (h, _) in enumerate(blocks) if h.startswith(head)), None)
        if start is None:
            continue
        keep.add(start)
        for i in range(start + 1, len(blocks)):
            if blocks[i][0].startswith("## ") or labels:
                break
            keep.add(i)
    for label in labels:
        for i, (h, _) in enumerate(blocks):
            title = h.lstrip("#").strip()
            if h.startswith("### ") and (title == label or title.startswith(label + " ")):
                keep.add(i)
                break
    return "\n".join("\n".join([blocks[i][0]] + blocks[i][1]) for i in sorted(keep)).strip()


def _stub_parts(u):
    """(the module's head: docstring and imports, [one stub per function])."""
    key = u.parent or u.name
    conv = reference.__doc__.split("Conventions of every unit:")[1].strip()
    head = [f'"""Unit {u.name}: {u.title}.', "",
            "Write the functions below; see README.md. " + conv[0].upper() + conv[1:],
            '"""', "from __future__ import annotations", ""] + IMPORTS[key]
    stubs = []
    for name in u.functions:
        fn = getattr(reference, name)
        doc = inspect.getdoc(fn)
        body = "\n".join("    " + ln if ln else "" for ln in doc.splitlines())
        stubs.append("\n".join([f"def {name}{inspect.signature(fn)}:", f'    """{body.lstrip()}', '    """',
                                f'    raise NotImplementedError("{name}")']))
    return "\n".join(head), stubs


def stub_source(u):
    """The student's module: every function of the unit with its body a NotImplementedError."""
    head, stubs = _stub_parts(u)
    return head + "\n" + "".join("\n\n" + f for f in stubs) + "\n"


def notebook_source(u):
    """The student's notebook (nbformat 4 JSON): the task statement, the imports, one cell per
    function to fill in (the stubs of :func:`stub_source`, solution cells blanked), and a last
    cell that runs the public checks on the kernel's functions. The grader reads the code
    cells as the module (:func:`minipatch.course.adapt.load_module`), without the last cell."""
    head, stubs = _stub_parts(u)
    check = ('if __name__ == "__main__":      # in the notebook: the public checks on the functions above\n'
             "    from minipatch.course.runner import check_here\n\n"
             f"    results = check_here({u.name!r}, globals())")
    cells = ([("markdown", readme_source(u, notebook=True)), ("code", head)] + [("code", f) for f in stubs]
             + [("markdown", "## Check\nThe public checks, on the functions as they are in this kernel (run the "
                             "cells above first). The grader runs these and the hidden ones on the saved notebook."),
                ("code", check)])
    nb = {"cells": [], "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}}}
    for i, (kind, text) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        nb["cells"].append(cell)
    return json.dumps(nb, indent=1) + "\n"


def adapters_source(u, module=None):
    module = module or u.module
    fns = "\n".join(f'''

def run_{n}{inspect.signature(getattr(reference, n))}:
    return _student().{n}({", ".join(inspect.signature(getattr(reference, n)).parameters)})''' for n in u.functions)
    return f'''"""Adapters: the one place that connects your code to the tests (the CS336 pattern).

The public tests call only ``implementation()``, whose functions are the run_* below. The
grader imports {module} by path and calls its functions by these names directly (it runs
nothing but that file), so keep the names and signatures of {module} as given.
"""
from pathlib import Path

from minipatch.course.adapt import Impl, load_module

MODULE = Path(__file__).with_name("{module}")


_loaded = []


def _student():
    if not _loaded:
        _loaded.append(load_module(MODULE, "{u.name}_submission"))
    return _loaded[0]
{fns}


def implementation():
    """The functions the checks call."""
    return Impl({{{", ".join(f'"{n}": run_{n}' for n in u.functions)}}}, MODULE.name)
'''


def tests_source(u):
    return f'''"""Public conformance checks of unit {u.name} (run: python -m pytest -q, in this folder).

The grader runs these and hidden ones (other seeds, shapes, dtypes, the degenerate cases of
MATH.md section 7), each check worth one point, scored by group.
"""
import pytest

import adapters
from minipatch.course.checks import checks_for
from minipatch.course.runner import outcome

CHECKS = checks_for({u.members!r})


@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_public(check):
    ok, message = outcome(check, adapters.implementation())
    assert ok, message
'''


def readme_source(u, notebook=False):
    pub, hid = checks_for(u.members), checks_for(u.members, hidden=True)
    key = u.name if u.name in EXCERPTS else u.parent
    text = math_md()
    math = excerpt(text, *EXCERPTS[key]) if text else (
        "(MATH.md, at the root of the minipatch repository, was not found here. "
        "Each function's docstring states its formula.)")
    groups = sorted({c.group for c in pub}, key=list(GROUP_TITLES).index)
    fn_lines = [f"- `{n}{inspect.signature(getattr(reference, n))}`: "
                f"{inspect.getdoc(getattr(reference, n)).splitlines()[0]}" for n in u.functions]
    return "\n".join([
        f"# Unit {u.name}: {u.title}", "",
        f"MATH.md {', '.join(u.math)}. Write the functions of `{u.module}` (each raises "
        "`NotImplementedError` until you do), with numpy, vectorized over tokens (no Python loop over "
        "tokens). You may import `minipatch.errors`, `minipatch.ops` and numpy; the rest of the model "
        "(attention, norms, the block forward) is given and always the reference's.", "",
        "## What to implement", "", *fn_lines, "",
        "## The mathematics (MATH.md)", "", math, "",
        "## How to test", "",
        "    python -m pytest -q                          # the public checks, in this folder",
        "    python -m minipatch grade .                  # the grader's report on the public checks",
        "",
        *([f"In `{_notebook_name(u)}` the last cell runs the public checks on the functions as they are in "
           "the kernel; the tests and the grader read the saved notebook's code cells.", ""] if notebook else []),
        f"{len(pub)} public checks here, {len(hid) - len(pub)} more hidden (other seeds, shapes, float32, "
        "the degenerate cases of MATH.md section 7). Groups:", "",
        *[f"- **{g}**: {GROUP_TITLES[g]}" for g in groups], "",
        "Why 1e-12 is fair in float64: every construction here is an identity, so its only error is "
        "rounding, about 1e-16 per operation; the checks allow a thousand times more. An error of 1e-9 "
        "is not rounding: it is a formula that is almost right (a missing eps, a wrong normalisation).", "",
        "Files: `adapters.py` connects your module to the tests (keep the function names of "
        f"`{u.module}`, the grader calls them directly); `assignment.json` tells the grader the unit.", ""])


def _notebook_name(u):
    return Path(u.module).with_suffix(".ipynb").name


def write_assignment(unit_name, out, force=False, notebook=False):
    """Write the student folder for ``unit_name`` into ``out``; returns the paths written.
    ``notebook=True``: the functions to write are cells of ``<unit>.ipynb`` instead of ``<unit>.py``."""
    u = get_unit(unit_name)
    out = Path(out)
    module = _notebook_name(u) if notebook else u.module
    files = {module: notebook_source(u) if notebook else stub_source(u), "adapters.py": adapters_source(u, module),
             f"test_{u.name}.py": tests_source(u), "README.md": readme_source(u, notebook),
             "assignment.json": json.dumps({"unit": u.name, "module": module, "functions": list(u.functions),
                                            "minipatch": __version__}, indent=1) + "\n"}
    clash = [n for n in files if (out / n).exists()]
    if clash and not force:
        raise InputError(f"{out} already has {', '.join(clash)} (use --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return [out / n for n in files]


__all__ = ["write_assignment", "stub_source", "notebook_source", "adapters_source", "tests_source", "readme_source",
           "excerpt", "math_md"]
