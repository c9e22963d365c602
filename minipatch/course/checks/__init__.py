"""Conformance checks of every course unit, one module per unit (registered on import).

Each check is the project's own theorem check parametrised by an implementation: the
repository's tests call these functions with the reference (``pytest -m m1`` runs them), the
grader with a student's module. See :mod:`minipatch.course.checks.base`.
"""
from __future__ import annotations

import importlib

from .base import REGISTRY, Check, HarnessError, checks_for  # noqa: F401

MODULES = ("m1m2", "m3m4", "m5", "m6", "m7", "m8", "thought")


def load_all():
    """Import every unit's check module (each registers its checks once)."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
