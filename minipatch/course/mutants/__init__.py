"""Plausible wrong implementations of every unit: each must lose marks, and together they must
fail every conformance check (a check no wrong implementation fails is a defect of the kit).

A :class:`Mutant` replaces some of a unit's reference functions by a wrong one and names the
group expected to catch it (others may too). ``python benchmarks/bench_grading.py`` writes
them out as submissions; ``tests/test_course.py`` grades each.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import reference
from ..adapt import Impl
from ..units import unit as get_unit


@dataclass(frozen=True)
class Mutant:
    """unit: the (sub-)unit graded. name: what is wrong. functions: name -> wrong function (the
    unit's other functions are the reference's). caught_by: the group that must catch it."""

    unit: str
    name: str
    functions: dict
    caught_by: str

    def impl(self, unit_name=None):
        """The implementation graded as ``unit_name`` (default: the mutant's own unit)."""
        fns = {n: getattr(reference, n) for n in get_unit(unit_name or self.unit).functions}
        fns.update(self.functions)
        return Impl(fns, f"mutant {self.unit}:{self.name}")


MUTANTS: list[Mutant] = []


def mutant(unit, name, caught_by, **functions):
    MUTANTS.append(Mutant(unit, name, functions, caught_by))


def mutants_of(unit_name):
    """The mutants graded as ``unit_name`` (a composite unit: those of its sub-units)."""
    from . import blocks, plain  # noqa: F401  (registration)

    members = get_unit(unit_name).members
    return [m for m in MUTANTS if m.unit in members]


def all_mutants():
    from . import blocks, plain  # noqa: F401

    return list(MUTANTS)


__all__ = ["Mutant", "MUTANTS", "mutant", "mutants_of", "all_mutants"]
