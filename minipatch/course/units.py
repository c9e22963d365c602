"""The course units: for each, the functions a student writes, where the reference lives,
its MATH.md labels and pytest markers. The conformance checks of a unit are in
:mod:`minipatch.course.checks` (public and hidden cases, one group each).

A unit's functions take and return plain arrays (a rank-1 patch is ``(u, v)``, the dense
``[T, out, in]``, or a :class:`~minipatch.patches.Rank1`); their signatures and docstrings
are those of :mod:`minipatch.course.reference`, the solution key, which delegates to the
spine module named in ``spine``. ``m6`` is made of four sub-units, one per construction.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

GROUPS = ("exact64", "exact32", "control", "rank", "min_norm", "errors", "no_mutation")
GROUP_TITLES = {
    "exact64": "exactness in float64 (1e-12 per block, 1e-10 through a model)",
    "exact32": "exactness in float32 (1e-4), dtype kept",
    "control": "negative controls: the patch is needed, specific, a no-op without context",
    "rank": "rank and structure of the patches",
    "min_norm": "minimum Frobenius norm",
    "errors": "named errors where a witness does not exist (MATH.md section 7)",
    "no_mutation": "inputs are not mutated",
}


@dataclass(frozen=True)
class Unit:
    """One unit of the course.

    Attributes:
      name: the unit's id ('m1m2', 'm6c', ...). title: one line.
      functions: names of the functions the student writes, in order.
      math: MATH.md labels (the task statement quotes these paragraphs).
      markers: pytest markers of its checks in the repository's suite.
      spine: the module(s) holding the reference construction.
      parent: the composite unit it belongs to (the m6 sub-units), else None.
      parts: the sub-units of a composite unit.
    """

    name: str
    title: str
    functions: tuple
    math: tuple
    markers: tuple
    spine: str
    parent: str | None = None
    parts: tuple = ()

    @property
    def module(self):
        """The student's file name: ``<unit>.py``."""
        return self.name + ".py"

    @property
    def members(self):
        """This unit and its sub-units (the names whose checks a grade runs)."""
        return (self.name,) + self.parts


_M6 = {
    "m6a": ("the paper's construction: an elementwise post-norm scale", ("m6a",), ("M6a",)),
    "m6b": ("M2 on the down-projection, then one scalar per token", ("m6b",), ("M6b",)),
    "m6c": ("the trust-region target, then an elementwise residual scale", ("trust_region", "m6c"),
            ("M6c", "M6c with exact zeros")),
    "m6d": ("M6b's direction with a floored multiplier: total and well conditioned", ("m6d",), ("M6d",)),
}

UNITS = {
    "m1m2": Unit("m1m2", "the absorption lemmas: rank-1 input and output absorption, minimum norm",
                 ("m1", "m2"), ("M1", "M2"), ("m1", "m2"), "minipatch.lemmas"),
    "m3m4": Unit("m3m4", "the vanilla contextual blocks of Dherin et al. (without and with skip, biases)",
                 ("m3", "m4"), ("M3", "M4"), ("m3", "m4"), "minipatch.blocks (vanilla_m3, vanilla_m4)"),
    "m5": Unit("m5", "implicit learning dynamics: a prompt read token by token is online gradient descent",
               ("implicit_steps", "gd_step"), ("M5",), ("m5",), "minipatch.dynamics"),
    "m6": Unit("m6", "the Gemma post-norm block: four exact constructions (M6a-M6d)",
               tuple(f for _, fs, _ in _M6.values() for f in fs), ("M6a", "M6b", "M6c", "M6d"), ("m6",),
               "minipatch.m6", parts=tuple(_M6)),
    **{k: Unit(k, t, fs, labels, ("m6",), "minipatch.m6", parent="m6") for k, (t, fs, labels) in _M6.items()},
    "m7": Unit("m7", "the multi-layer algorithm: layer by layer, closed loop, on the kept tokens only",
               ("m7",), ("M7",), ("m7",), "minipatch.absorb"),
    "m8": Unit("m8", "controllability: the witnesses, the executable definitions, the general theorem",
               ("inner_witness", "moe_outer_witness", "m8", "check_input_controllable",
                "check_output_controllable"), ("M8",), ("m8",), "minipatch.controllability, minipatch.experts"),
    "thought": Unit("thought", "token-independent condensation: least-squares thought vectors and matrices",
                    ("thought_vector", "thought_matrix"), ("thought",), ("thought",), "minipatch.thought"),
}


def unit(name):
    """The :class:`Unit` called ``name``; :class:`~minipatch.errors.InputError` naming the known ones."""
    try:
        return UNITS[name]
    except KeyError:
        raise InputError(f"unknown unit {name!r}; one of {', '.join(UNITS)}") from None


__all__ = ["Unit", "UNITS", "GROUPS", "GROUP_TITLES", "unit"]
