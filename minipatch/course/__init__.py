"""The course kit: every theorem an assignment (units, stubs, conformance checks, grader).

    python -m minipatch assignment m6 --out hw6        # a student folder
    python -m minipatch assignment m6 --out hw6 --notebook   # its functions as notebook cells
    python -m minipatch grade hw6 --hidden --json      # scores, Gradescope results.json shape

:mod:`~minipatch.course.units` lists the units and the functions a student writes;
:mod:`~minipatch.course.reference` is the solution key (it delegates to the spine);
:mod:`~minipatch.course.checks` holds the conformance checks (the repository's own theorem
checks, parametrised by implementation); :mod:`~minipatch.course.grade` runs them on a
submission in a subprocess; :mod:`~minipatch.course.mutants` are plausible wrong
implementations the kit must catch.
"""
from .units import GROUPS, UNITS, Unit, unit

__all__ = ["GROUPS", "UNITS", "Unit", "unit"]
