"""``python -m minipatch experiment``: the generation experiment of Goldwaser et al. 2025, section 4,
on the real Gemma 3 270M (:mod:`minipatch.experiment`; MATH.md M6, M7).

    python -m minipatch experiment [--n-new 20] [--prompts 1,2] [--json out.json]
        [--figure figures/experiment_generation.png] [--dtypes float32,float64,bfloat16]
        [--methods m6a,m6c,m6d] [--orders closed,open] [--engine lockstep|single]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MinipatchError
from ..experiment import DTYPES, ENGINES, METHODS, ORDERS, PROMPTS, run_experiment
from ..experiment_report import format_table, plot


def add_parser(sub):
    """Register the ``experiment`` subcommand on the argparse subparsers ``sub``."""
    p = sub.add_parser("experiment", help="Goldwaser et al. section 4 on real Gemma 3 270M: "
                                          "greedy with context vs patched with only the current token")
    p.add_argument("--n-new", type=int, default=20, help="new tokens per prompt (default 20)")
    p.add_argument("--prompts", default=None, help="comma-separated prompt numbers 1..5 (default all)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ",".join(DTYPES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated witnesses (default "
                   + ",".join(METHODS) + ")")
    p.add_argument("--orders", default=",".join(ORDERS), help="M7 order(s) of construction: closed,open")
    p.add_argument("--model", default=None, help="GGUF path (default: the [real] extra's Gemma 3 270M)")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--figure", default="output/figures/experiment_generation.png",
                   help="figure path ('' for none; the committed one is figures/experiment_generation.png)")
    p.add_argument("--engine", default="lockstep", choices=ENGINES,
                   help="lockstep: every run of a dtype advanced together (default); single: each run alone "
                        "through minipatch.greedy (the same values up to rounding, slower)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args):
    """Run the ``experiment`` subcommand; exit status 0, or 2 if the model cannot be loaded."""
    from .. import load
    from ..io.gguf import gemma3_270m_path, read_gguf_metadata
    from ..io.tokenizer import tokenizer_from_gguf

    try:
        path = args.model or gemma3_270m_path()
        model = load(path, dtype="float64")
        tok = tokenizer_from_gguf(read_gguf_metadata(path))
    except (MinipatchError, ImportError, OSError) as e:
        print(f"experiment: cannot load the model: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    prompts = list(PROMPTS)
    if args.prompts:
        prompts = [prompts[int(i) - 1] for i in args.prompts.split(",")]
    try:
        dtypes, methods, orders = (tuple(a.split(",")) for a in (args.dtypes, args.methods, args.orders))
        for what, got, allowed in (("dtype", dtypes, DTYPES), ("method", methods, METHODS + ("auto",)),
                                   ("order", orders, ORDERS)):
            bad = [g for g in got if g not in allowed]
            if bad:
                raise MinipatchError(f"unknown {what} {bad[0]!r}; one of {', '.join(allowed)}")
    except MinipatchError as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    res = run_experiment(model, tok, prompts, n_new=args.n_new, dtypes=dtypes, methods=methods,
                         progress=not args.no_progress, orders=orders, engine=args.engine)
    print(format_table(res["summary"]))
    print(f"\n{len(prompts)} prompts x {args.n_new} tokens, {args.engine} engine, in {res['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"results: {args.json}")
    if args.figure:
        print(f"figure: {plot(res, args.figure)}")
    return 0
