"""The check registry and the helpers every unit's checks share.

A check is a plain function ``fn(impl, **case)`` that raises AssertionError (with a message
a student can act on) when the implementation is wrong. ``@check(unit, group, cases=...)``
registers it once per case, public or hidden; the function itself stays callable, so the
repository's tests (``tests/test_*.py``) call the very same function on the reference,
with their own cases and hypothesis strategies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ... import metrics

from ..units import GROUPS

# MATH.md section 8
TOL64_BLOCK = 1e-12
TOL64_MODEL = 1e-10
TOL32 = 1e-4
CONTROL_MIN = 1e-3     # a negative control must miss by at least this (relative)


class HarnessError(AssertionError):
    """A check's own set-up is wrong (e.g. its negative control is not far): a bug of the kit."""


@dataclass(frozen=True)
class Check:
    """One registered conformance check.

    Attributes:
      unit: the (sub-)unit. group: one of :data:`~minipatch.course.units.GROUPS`.
      name: function name plus the case label. hidden: only with ``--hidden``.
      doc: the first line of the function's docstring. case: keyword arguments.
    """

    unit: str
    group: str
    name: str
    fn: object = field(repr=False)
    hidden: bool = False
    doc: str = ""
    case: dict = field(default_factory=dict, repr=False)

    @property
    def id(self):
        return f"{self.unit}.{self.group}.{self.name}"

    def run(self, impl):
        self.fn(impl, **self.case)


REGISTRY: list[Check] = []


def _label(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


def check(unit, group, public=(None,), hidden=()):
    """Register ``fn(impl, **case)`` for each public and hidden case (``None``: no arguments)."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}")

    def deco(fn):
        doc = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        for cases, is_hidden in ((public, False), (hidden, True)):
            for case in cases:
                case = dict(case or {})
                name = fn.__name__ + (f"[{_label(case)}]" if case else "")
                REGISTRY.append(Check(unit, group, name, fn, is_hidden, doc, case))
        return fn
    return deco


def checks_for(members, hidden=False):
    """The registered checks of the (sub-)units ``members``, public first, then hidden."""
    from . import load_all

    load_all()
    out = [c for c in REGISTRY if c.unit in members and not c.hidden]
    if hidden:
        out += [c for c in REGISTRY if c.unit in members and c.hidden]
    return out


# ---- helpers ----------------------------------------------------------------------------------

def rng(seed):
    return np.random.default_rng(seed)


def rel_err(a, b):
    """:func:`minipatch.metrics.rel_err` of arrays that must have the same shape (a student's
    result of another shape fails its check with that message, not a broadcast)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape}, expected {b.shape}")
    return metrics.rel_err(a, b)


MARGINS: list | None = None   # set to a list to record (what, error, tolerance) of every close()


def close(got, want, tol, what):
    """Assert ``got`` equals ``want`` to relative ``tol`` (NaN/inf fail), naming ``what``."""
    g = np.asarray(got)
    if not np.all(np.isfinite(g)):
        raise AssertionError(f"{what}: contains NaN or inf")
    err = rel_err(g, want)
    if MARGINS is not None:
        MARGINS.append((what, err, tol))
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.2e} > {tol:.0e}")
    return err


def far(got, want, what, least=CONTROL_MIN):
    """Assert ``got`` misses ``want`` by at least ``least`` relative (a negative control)."""
    err = rel_err(got, want)
    if not err >= least:
        raise AssertionError(f"{what}: relative difference {err:.2e} < {least:.0e}")
    return err


def setup_far(got, want, what):
    """The case's own negative control: without the patch the result must be far."""
    try:
        far(got, want, what)
    except AssertionError as e:
        raise HarnessError(f"kit bug, the case is degenerate: {e}") from None


def same_dtype(x, dtype, what):
    x = np.asarray(x)
    if x.dtype != np.dtype(dtype):
        raise AssertionError(f"{what}: dtype {x.dtype}, expected {np.dtype(dtype)} (keep the input's dtype)")


def raises(exc, fn, *args, what, check=None, **kw):
    """Assert ``fn(*args)`` raises ``exc`` (the named minipatch error), optionally checking it."""
    try:
        out = fn(*args, **kw)
    except exc as e:
        if check is not None:
            check(e)
        return e
    except NotImplementedError:
        raise
    except Exception as e:   # noqa: BLE001 - reported to the student
        raise AssertionError(f"{what}: raised {type(e).__name__}: {e}; expected {exc.__name__}") from None
    raise AssertionError(f"{what}: returned {_summary(out)} instead of raising {exc.__name__}")


def _summary(out):
    arrs = [out] if hasattr(out, "shape") else [x for x in (out if isinstance(out, (tuple, list)) else ())
                                                if hasattr(x, "shape")]
    bad = any(not np.all(np.isfinite(np.asarray(a, dtype=np.float64))) for a in arrs)
    return "values with NaN or inf" if bad else "a value"


def frozen(*arrays):
    """Copies to compare against after a call (:func:`unchanged`)."""
    return [np.array(a, copy=True) for a in arrays]


def unchanged(arrays, copies, names):
    for a, c, n in zip(arrays, copies, names):
        if not np.array_equal(np.asarray(a), c, equal_nan=True):
            raise AssertionError(f"the input {n} was modified in place")


def dense(p, t):
    return np.asarray(p.dense(t))


def rank(m, tol=None):
    return int(np.linalg.matrix_rank(np.asarray(m, dtype=np.float64), tol=tol))


__all__ = ["Check", "REGISTRY", "check", "checks_for", "HarnessError", "TOL64_BLOCK", "TOL64_MODEL", "TOL32",
           "CONTROL_MIN", "rng", "rel_err", "close", "far", "setup_far", "same_dtype", "raises", "frozen",
           "unchanged", "dense", "rank"]
