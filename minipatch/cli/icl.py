"""``python -m minipatch icl-tasks`` (the condensation study) and ``python -m minipatch export``.

    python -m minipatch icl-tasks                        # the full study (Gemma 3 270M, float32)
    python -m minipatch icl-tasks --tables figures/icl_study.json   # print the README tables
    python -m minipatch export DIR --task present-past --n 16 --form lstsq   # a prompt as a checkpoint

The study writes its JSON (default ``output/icl_study.json``; the README's numbers are in
``figures/icl_study.json``) and its figure, and caches each (task, seed) under
``$MINIPATCH_CACHE/icl`` (or ``~/.cache/minipatch/icl``), so a rerun only does what is missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..icl_tasks import real_model


def compact_json(obj):
    """JSON text with floats to 6 significant digits and no spaces (the results hold every
    query's scores)."""
    def rnd(x):
        if isinstance(x, float):
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: rnd(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rnd(v) for v in x]
        return x

    return json.dumps(rnd(obj), separators=(",", ":"))


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def study_main(args):
    from .. import icl_report
    from ..condense_study import StudyConfig, run_study

    if args.tables:
        print(icl_report.tables(json.loads(Path(args.tables).read_text(encoding="utf-8"))), end="")
        return 0
    cfg = StudyConfig()
    kw = {}
    if args.tasks:
        kw["tasks"] = tuple(args.tasks.split(","))
    if args.seeds:
        kw["seeds"] = _ints(args.seeds)
    if args.sizes:
        kw["sizes"] = _ints(args.sizes)
    cfg = StudyConfig(**{**cfg.__dict__, **kw})
    model, bos, encode = real_model()
    cache = None if args.no_cache else Path(os.environ.get("MINIPATCH_CACHE") or Path.home() / ".cache" / "minipatch") / "icl"
    result = run_study(model, bos, encode, cfg, cache=cache)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(compact_json(result) + "\n", encoding="utf-8")
    print(f"results: {out} ({result['seconds']:.0f} s)")
    try:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        icl_report.figure(result, args.figure)
        print(f"figure: {args.figure}")
    except ImportError:
        print("(matplotlib not installed: no figure)")
    print(icl_report.tables(result), end="")
    return 0


def export_main(args):
    """Condense one task's 10-shot prompt into every layer (T2 or T3) and write the edited model."""
    import warnings

    import numpy as np

    from .. import icl_tasks as it
    from ..condense_data import collect, layer_edit
    from ..thought import RankDeficientWarning, condensed_model

    model, bos, encode = real_model()
    V = model.cfg.vocab_size
    sp = it.split(it.encode_examples(it.load_task(args.task), encode), args.seed, 10, max(args.n, 1), 0)
    ctx = it.batch(bos, it.demo_tokens(sp.demos, encode), sp.calib, encode, V)
    noctx = it.batch(bos, [], sp.calib, encode, V)
    cal, _, _ = collect(model, ctx, noctx, it.kept_rows(ctx, noctx))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        deltas = [layer_edit(model, cal, l, args.n, args.form)[args.form].deltas for l in range(model.cfg.n_layers)]
    edited = condensed_model(model, deltas)
    folder = edited.save_pretrained(args.dir, extra={"bos_token_id": bos})
    demo = " ".join(f"{d.x} -> {d.y};" for d in sp.demos[:3])
    print(f"wrote {folder} (config.json, model.safetensors): Gemma 3 270M with the {args.task} prompt "
          f"({demo} ...) condensed ({args.form}, all layers, {args.n} calibration queries)")
    print(f"run it without the demonstrations: {it.HEAD + it.QUERY.format(x='<word>')!r}")
    return int(not np.isfinite(sum(float(np.sum(np.abs(d))) for lp in deltas for d in lp.values())))


def add_parsers(sub):
    p = sub.add_parser("icl-tasks", help="prompts into weights: the in-context condensation study")
    p.add_argument("--json", default="output/icl_study.json", help="results file (default output/icl_study.json)")
    p.add_argument("--figure", default=os.path.join(os.environ.get("MINIPATCH_FIGURES", "output/figures"),
                                                    "icl_study.png"))
    p.add_argument("--tasks", help="comma-separated task names (default: all nine)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--sizes", help="calibration sizes (default 1,4,16,64)")
    p.add_argument("--no-cache", action="store_true", help="recompute every (task, seed)")
    p.add_argument("--tables", metavar="JSON", help="only print the README tables of a results file")
    p.set_defaults(func=study_main)
    e = sub.add_parser("export", help="a task's prompt condensed into Gemma 3 270M, as a Hugging Face folder")
    e.add_argument("dir", help="output folder (config.json + model.safetensors, ~1.1 GB)")
    e.add_argument("--task", default="present-past")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--n", type=int, default=16, help="calibration queries")
    e.add_argument("--form", choices=("lstsq", "ridge"), default="lstsq")
    e.set_defaults(func=export_main)


__all__ = ["compact_json", "study_main", "export_main", "add_parsers"]
