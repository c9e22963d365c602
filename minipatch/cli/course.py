"""The ``assignment`` and ``grade`` subcommands of ``python -m minipatch``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError


def assignment_main(args):
    from ..course.assignment import write_assignment

    try:
        paths = write_assignment(args.unit, args.out, args.force, args.notebook)
    except InputError as e:
        print(f"assignment: {e}", file=sys.stderr)
        return 2
    print(f"unit {args.unit}: wrote " + ", ".join(p.name for p in paths) + f" in {args.out}")
    return 0


def grade_main(args):
    from ..course.grade import format_text, grade_dir, grade_many, gradescope, summary

    kw = dict(timeout=args.timeout, check_timeout=args.check_timeout)
    try:
        if len(args.dirs) == 1:
            name, module, results = grade_dir(args.dirs[0], args.unit, args.hidden, **kw)
            report = gradescope(results, name)
            print(json.dumps(report, indent=1) if args.json else format_text(results, name, module, args.hidden))
        else:
            report = {"submissions": []}
            for folder, got in grade_many(args.dirs, args.unit, args.hidden, args.jobs, **kw):
                if isinstance(got, InputError):
                    print(f"{folder}: {got}", file=sys.stderr)
                    continue
                name, _, results = got
                report["submissions"].append(dict(folder=str(folder), **gradescope(results, name)))
                if not args.json:
                    groups = "  ".join(f"{g} {p}/{n}" for g, (p, n) in summary(results).items())
                    print(f"{folder}: {sum(r['passed'] for r in results)}/{len(results)}  {groups}")
            if args.json:
                print(json.dumps(report, indent=1))
    except InputError as e:
        print(f"grade: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def add_parsers(sub):
    """Register ``assignment`` and ``grade`` on the main parser's subparsers."""
    from ..course.units import UNITS

    a = sub.add_parser("assignment", help="write a student folder for one unit (stubs, adapters, public tests, task)")
    a.add_argument("unit", choices=list(UNITS))
    a.add_argument("--out", required=True, help="the folder to write")
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a.add_argument("--notebook", action="store_true",
                   help="the functions as cells of a Jupyter notebook (<unit>.ipynb) instead of a module")
    a.set_defaults(func=assignment_main)
    g = sub.add_parser("grade", help="grade submission folders: scores per check and group")
    g.add_argument("dirs", nargs="+", metavar="DIR", help="submission folder(s)")
    g.add_argument("--unit", choices=list(UNITS), help="the unit (default: the folder's assignment.json)")
    g.add_argument("--hidden", action="store_true", help="add the hidden checks")
    g.add_argument("--json", action="store_true", help="print Gradescope's results.json shape")
    g.add_argument("--out", help="also write the JSON to this file")
    g.add_argument("--jobs", type=int, default=2, help="submissions graded at once (several DIRs)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds for one submission (default 120)")
    g.add_argument("--check-timeout", type=float, default=20.0, help="seconds for one check (default 20)")
    g.set_defaults(func=grade_main)
