"""The grader: a submission folder in, a score per check and per group out.

:func:`grade_dir` finds the student's module (``<unit>.py``, named in ``assignment.json``),
runs :mod:`minipatch.course.runner` on it in a child process with a wall-clock limit (a
hanging or crashing submission costs its own marks, never the grader), and returns one
result per check. :func:`summary` scores the groups; :func:`gradescope` is the
``results.json`` shape autograders ingest; :func:`format_text` the table a person reads.
Nothing in the folder but that one module is imported or executed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError
from .runner import failed_all
from .units import GROUP_TITLES, GROUPS, unit as get_unit

MANIFEST = "assignment.json"


def manifest(folder):
    """The folder's ``assignment.json`` (written by ``assignment``), or {} when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a JSON object ({e})") from None
    return data if isinstance(data, dict) else {}


def locate(folder, unit_name=None):
    """(unit name, path of the student's module) for a submission folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    info = manifest(folder)
    name = unit_name or info.get("unit")
    if name is None:
        raise InputError(f"{folder} has no {MANIFEST}: say which unit with --unit")
    u = get_unit(name)
    names = [info.get("module"), u.module] + ([get_unit(u.parent).module] if u.parent else [])
    for n in filter(None, names):
        if (folder / Path(n).name).is_file():
            return u.name, folder / Path(n).name
    raise InputError(f"{folder} has no {u.module}")


def _child_env():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])       # the minipatch this grader runs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")                          # one core per submission
    return env


def grade_dir(folder, unit_name=None, hidden=False, timeout=120.0, check_timeout=20.0):
    """Grade one submission folder in a child process.

    Returns:
      (unit name, module path, list of result dicts as :func:`minipatch.course.runner.record`).
    """
    name, module = locate(folder, unit_name)
    with tempfile.TemporaryDirectory(prefix="minipatch-grade-") as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, "-m", "minipatch.course.runner", str(module.resolve()), name, str(out),
               "--check-timeout", str(check_timeout)] + (["--hidden"] if hidden else [])
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=_child_env(), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return name, module, failed_all(name, hidden, f"the grade took longer than {timeout:g} s and was stopped")
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            return name, module, failed_all(name, hidden, f"the grader's child process failed "
                                                          f"(exit {proc.returncode}): {tail[0]}")
        return name, module, json.loads(out.read_text())


def grade_many(folders, unit_name=None, hidden=False, jobs=2, **kw):
    """Grade several folders, ``jobs`` child processes at a time: list of (folder, outcome)."""
    def one(folder):
        try:
            return folder, grade_dir(folder, unit_name, hidden, **kw)
        except InputError as e:
            return folder, e
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, folders))


def summary(results):
    """group -> (passed, total), in :data:`GROUPS` order (groups without checks left out)."""
    out = {}
    for g in GROUPS:
        rs = [r for r in results if r["group"] == g]
        if rs:
            out[g] = (sum(r["passed"] for r in rs), len(rs))
    return out


def gradescope(results, unit_name=None):
    """Gradescope's results.json: one test per check (1 point each), hidden ones shown after publishing."""
    groups = summary(results)
    tests = [{"name": f"{r['unit']} {r['group']}: {r['name']}", "score": 1.0 if r["passed"] else 0.0,
              "max_score": 1.0, "output": r["doc"] + ("" if r["passed"] else "\n" + r["output"]),
              "tags": [r["unit"], r["group"]], "visibility": "after_published" if r["hidden"] else "visible"}
             for r in results]
    lines = [f"{g:12s} {p}/{n}" for g, (p, n) in groups.items()]
    return {"score": float(sum(t["score"] for t in tests)), "tests": tests,
            "output": "minipatch grade" + (f", unit {unit_name}" if unit_name else "") + "\n" + "\n".join(lines),
            "extra_data": {"unit": unit_name, "max_score": float(len(tests)),
                           "groups": {g: {"score": p, "max_score": n} for g, (p, n) in groups.items()}}}


def format_text(results, unit_name, module, hidden):
    """A table per group with the failed checks and their messages."""
    groups = summary(results)
    head = f"minipatch grade: unit {unit_name}, {module}, {'public + hidden' if hidden else 'public'} checks"
    lines = [head, ""]
    for g, (p, n) in groups.items():
        lines.append(f"{g:12s} {p:3d}/{n:<3d} {GROUP_TITLES[g]}")
        for r in results:
            if r["group"] == g and not r["passed"]:
                lines.append(f"    FAIL {r['unit']}.{r['name']}: {r['output']}")
    total = sum(p for p, _ in groups.values())
    lines += ["", f"score {total}/{len(results)}"]
    return "\n".join(lines)


__all__ = ["grade_dir", "grade_many", "locate", "manifest", "summary", "gradescope", "format_text"]
