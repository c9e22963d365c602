"""Run one unit's checks on one implementation and record a result per check.

In-process (:func:`run_checks`, used by the kit's own tests; :func:`check_here`, the last cell
of a notebook assignment) or as the grader's child process:

    python -m minipatch.course.runner MODULE.py UNIT RESULTS.json [--hidden] [--check-timeout S]

The child imports only MODULE.py (by path), runs every check with a per-check time limit,
and writes the results to RESULTS.json (not stdout, which the submission may print to).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

from .adapt import MissingFunction, ReturnValueError, impl_of, load_module
from .checks import HarnessError, checks_for
from .units import unit as get_unit


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """SIGALRM after ``seconds`` (POSIX main thread only; otherwise no limit)."""
    usable = seconds and hasattr(signal, "setitimer")
    if usable:
        def on_alarm(signum, frame):
            raise CheckTimeout()
        try:
            old = signal.signal(signal.SIGALRM, on_alarm)
        except ValueError:          # not the main thread
            usable = False
    if not usable:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _where(exc, source):
    """' (m1m2.py line 12, in m1)' for the innermost frame in the submission, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).name == source or f.filename.startswith(source + " cell ")]   # notebooks
    if not frames:
        return "", None
    f = frames[-1]
    return f" ({Path(f.filename).name} line {f.lineno}, in {f.name})", f.name


def outcome(check, impl, timeout=None):
    """(passed, message) of one check; exceptions become messages a student can act on."""
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            check.run(impl)
        return True, "ok"
    except CheckTimeout:
        return False, f"took longer than {timeout:g} s (an endless loop?)"
    except HarnessError as e:
        return False, f"kit error, not yours: {e}"
    except NotImplementedError as e:
        where, fn = _where(e, impl.source)
        fn = fn or next((a for a in e.args if a in impl.names), None)    # the stubs raise NotImplementedError(name)
        return False, f"{fn or 'a function'} is not implemented yet (raises NotImplementedError){where}"
    except (MissingFunction, ReturnValueError) as e:
        return False, str(e)
    except AssertionError as e:
        return False, str(e) or "assertion failed"
    except Exception as e:   # noqa: BLE001 - the submission's own error
        where, _ = _where(e, impl.source)
        return False, f"{type(e).__name__}: {e}{where}"
    except SystemExit:
        return False, "the submission called exit()"


def record(check, passed, message, seconds=0.0):
    return {"id": check.id, "unit": check.unit, "group": check.group, "name": check.name,
            "hidden": check.hidden, "doc": check.doc, "passed": bool(passed), "output": message,
            "seconds": round(seconds, 4)}


def run_checks(unit_name, impl, hidden=False, timeout=None):
    """Every check of ``unit_name`` (and its sub-units) on ``impl``: a list of result dicts."""
    out = []
    for c in checks_for(get_unit(unit_name).members, hidden):
        t0 = time.perf_counter()
        ok, msg = outcome(c, impl, timeout)
        out.append(record(c, ok, msg, time.perf_counter() - t0))
    return out


def check_here(unit_name, namespace, hidden=False):
    """The unit's checks on the functions defined in ``namespace`` (a notebook's ``globals()``),
    each printed as PASS or FAIL with its message, then the total. Returns the results."""
    u = get_unit(unit_name)
    impl = impl_of(SimpleNamespace(**{n: namespace.get(n) for n in u.functions}), u.functions, "this notebook")
    results = run_checks(unit_name, impl, hidden)
    for r in results:
        print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['id']}" + ("" if r["passed"] else f": {r['output']}"))
    print(f"{sum(r['passed'] for r in results)}/{len(results)} checks passed")
    return results


def failed_all(unit_name, hidden, message):
    """Results when nothing could run (the module does not import, the grade timed out)."""
    return [record(c, False, message) for c in checks_for(get_unit(unit_name).members, hidden)]


def run_module(path, unit_name, hidden=False, timeout=None):
    """Import the module at ``path`` and run the unit's checks on it."""
    u = get_unit(unit_name)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            mod = load_module(path)
    except BaseException as e:   # noqa: BLE001 - SyntaxError, ImportError, SystemExit at import...
        if isinstance(e, KeyboardInterrupt):
            raise
        where, _ = _where(e, Path(path).name)
        return failed_all(unit_name, hidden, f"cannot import {Path(path).name}: {type(e).__name__}: {e}{where}")
    impl = impl_of(mod, u.functions, Path(path).name)
    with contextlib.redirect_stdout(sys.stderr):
        return run_checks(unit_name, impl, hidden, timeout)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minipatch.course.runner")
    ap.add_argument("module")
    ap.add_argument("unit")
    ap.add_argument("results")
    ap.add_argument("--hidden", action="store_true")
    ap.add_argument("--check-timeout", type=float, default=20.0)
    a = ap.parse_args(argv)
    results = run_module(a.module, a.unit, a.hidden, a.check_timeout)
    Path(a.results).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
