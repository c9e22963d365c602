"""The course's conformance checks are the project's theorem tests, parametrised by implementation.

Every check the grader runs (``minipatch.course.checks``, public and hidden cases) is one test
here, marked with its unit's theorem markers, so ``pytest -m m6`` runs the M6 checks and
``pytest -m m1`` the M1/M2 ones. By default they run against the reference (the solution key,
which delegates to the spine); ``MINIPATCH_IMPL=DIR`` runs them against a student folder
written by ``python -m minipatch assignment`` instead (its ``<unit>.py``), which is what the
grader does, check by check, in a child process.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from minipatch.course import UNITS
from minipatch.course.adapt import load_impl, reference_impl
from minipatch.course.checks import checks_for
from minipatch.course.runner import outcome

LEAVES = [name for name, u in UNITS.items() if not u.parts]


def _params():
    out = []
    for name in LEAVES:
        marks = [getattr(pytest.mark, m) for m in UNITS[name].markers]
        for c in checks_for((name,), hidden=True):
            out.append(pytest.param(name, c, id=f"{c.id}{'[hidden]' if c.hidden else ''}", marks=marks))
    return out


_IMPLS = {}


def implementation(unit_name):
    """The reference, or the unit's module in $MINIPATCH_IMPL (a student folder)."""
    if unit_name not in _IMPLS:
        folder = os.environ.get("MINIPATCH_IMPL")
        if folder:
            u = UNITS[unit_name]
            module = Path(folder) / (UNITS[u.parent].module if u.parent else u.module)
            if not module.is_file():
                pytest.skip(f"MINIPATCH_IMPL={folder} has no {module.name}")
            _IMPLS[unit_name] = load_impl(module, unit_name)
        else:
            _IMPLS[unit_name] = reference_impl(unit_name)
    return _IMPLS[unit_name]


@pytest.mark.parametrize("unit_name,check", _params())
def test_conformance(unit_name, check):
    ok, message = outcome(check, implementation(unit_name))
    assert ok, f"{check.id}: {check.doc}\n{message}"


def test_every_unit_has_checks_in_every_group_it_claims():
    for name in LEAVES:
        groups = {c.group for c in checks_for((name,), hidden=True)}
        assert {"exact64", "control", "no_mutation"} <= groups, (name, groups)
