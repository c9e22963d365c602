"""Grade a class of submissions of one unit, as an instructor would (the course kit, issue: under a
minute for 30 submissions on 2 cores).

    python benchmarks/bench_grading.py                 # unit m7, 30 submissions, public + hidden checks
    python benchmarks/bench_grading.py --unit m6d --n 30 --jobs 2
    python benchmarks/bench_grading.py --unit all      # every unit, one line each

The class is generated: ``python -m minipatch assignment UNIT`` folders whose student module is,
in turn, the reference solution, the untouched stub, or one of the unit's plausible wrong
implementations (``minipatch.course.mutants``). They are graded with ``python -m minipatch grade
DIR ... --hidden --jobs J`` (each submission in its own child process, as in a real class). It
prints the wall-clock time, the time per submission, and the score distribution, and checks
that the references get full marks, the stubs zero and every mutant less than full marks.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from minipatch.course import UNITS
from minipatch.course.assignment import write_assignment
from minipatch.course.grade import grade_many
from minipatch.course.mutants import all_mutants

REFERENCE = "from minipatch.course.reference import {names}  # the solution key\n"
MUTANT = ("from minipatch.course.mutants import all_mutants\n"
          "_m = [m for m in all_mutants() if m.unit == {unit!r}][{k}]\n"
          "globals().update({{n: getattr(_m.impl(), n) for n in {names!r}}})\n")


def write_class(unit, n, root):
    """``n`` submission folders of ``unit`` under ``root``: [(folder, kind)]."""
    u = UNITS[unit]
    mutants = [m for m in all_mutants() if m.unit == unit]
    out = []
    for i in range(n):
        folder = root / f"student{i:02d}"
        write_assignment(unit, folder)
        kind = ("reference", "stub", "mutant")[i % 3] if mutants else ("reference", "stub")[i % 2]
        module = folder / u.module
        if kind == "reference":
            module.write_text(REFERENCE.format(names=", ".join(u.functions)))
        elif kind == "mutant":
            k = (i // 3) % len(mutants)
            module.write_text(MUTANT.format(unit=unit, k=k, names=tuple(u.functions)))
            kind = f"mutant: {mutants[k].name}"
        out.append((folder, kind))
    return out


def grade_class(unit, n, jobs, hidden=True):
    with tempfile.TemporaryDirectory() as tmp:
        subs = write_class(unit, n, Path(tmp))
        t0 = time.perf_counter()
        graded = grade_many([f for f, _ in subs], unit, hidden, jobs)
        seconds = time.perf_counter() - t0
    rows, problems = [], []
    for (folder, kind), (_, got) in zip(subs, graded):
        if isinstance(got, Exception):
            problems.append(f"{folder.name}: {got}")
            continue
        _, _, results = got
        score, total = sum(r["passed"] for r in results), len(results)
        rows.append((kind, score, total))
        ok = {"reference": score == total, "stub": score == 0}.get(kind, score < total)
        if not ok:
            problems.append(f"{folder.name} ({kind}): {score}/{total}")
    return seconds, rows, problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit", default="m7", help="a unit name or 'all' (default m7)")
    p.add_argument("--n", type=int, default=30, help="submissions (default 30)")
    p.add_argument("--jobs", type=int, default=2, help="submissions graded at once (default 2)")
    p.add_argument("--public", action="store_true", help="public checks only (default: public + hidden)")
    args = p.parse_args(argv)
    units = [u for u, v in UNITS.items() if not v.parts] if args.unit == "all" else [args.unit]
    bad = 0
    for unit in units:
        seconds, rows, problems = grade_class(unit, args.n, args.jobs, not args.public)
        kinds = {}
        for kind, score, total in rows:
            kinds.setdefault(kind.split(":")[0], []).append(f"{score}/{total}")
        spread = "; ".join(f"{k} x{len(v)}: {', '.join(sorted(set(v)))}" for k, v in kinds.items())
        print(f"{unit:8s} {args.n} submissions in {seconds:5.1f} s ({seconds / args.n:.2f} s each, "
              f"{args.jobs} at once)   {spread}")
        for line in problems:
            print("   PROBLEM " + line)
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
