"""What the condensation study (``python -m minipatch icl-tasks``) costs, on the real Gemma 3 270M.

    python benchmarks/bench_icl.py                 # float32, ~2 min on 2 cores
    python benchmarks/bench_icl.py --json output/bench_icl.json

Measured in one run (best of ``--repeats`` interleaved rounds after a warm-up,
``benchmarks/_timing.py``), on one task's real prompts (present-past, seed 0):

* one 10-shot prompt (~60 tokens): forward with logits, forward without the head, and ``absorb``
  of its demonstrations (M7) -- the unit costs the study is budgeted in;
* 40 zero-shot queries: 40 separate forwards against one packed run (``minipatch.packed``), and
  the same for the 10-shot prompts, whose demonstrations the packed run reads once;
* the head on 128 rows (262144 x 640 logits each), which the study groups;
* one (task, seed) of the study's condensation (``condense_seed``), once, with its phases.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _timing import best_of  # benchmarks/_timing.py (the script's folder is on sys.path)

import minipatch as mp
from minipatch import icl_tasks as it
from minipatch import packed
from minipatch.condense_study import StudyConfig, baselines, condense_seed
from minipatch.icl_tasks import real_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model, bos, encode = real_model("float32")
    V = model.cfg.vocab_size
    cfg = StudyConfig()
    sp = it.split(it.encode_examples(it.load_task("present-past"), encode), 0, cfg.n_demos, cfg.n_calib, cfg.n_held)
    demos = it.demo_tokens(sp.demos, encode)
    prompt = np.r_[bos, demos, encode(it.HEAD), sp.held[0].query]
    zero, shot = it.batch(bos, [], sp.held, encode, V), it.batch(bos, demos, sp.held, encode, V)
    seqs0 = [np.r_[bos, encode(it.HEAD), e.query] for e in sp.held]
    seqs1 = [np.r_[bos, demos, encode(it.HEAD), e.query] for e in sp.held]
    rows = model.xp.asarray(np.zeros((128, model.cfg.d_model), np.float32))
    fns = {
        "prompt forward": lambda: model.forward(prompt),
        "prompt forward, no head": lambda: model.run(prompt, head=False),
        "prompt absorb": lambda: mp.absorb(model, prompt, np.arange(1, 1 + demos.size)),
        "40 zero-shot forwards": lambda: [model.run(s, head=False) for s in seqs0],
        "40 zero-shot packed": lambda: packed.run(model, zero.pack),
        "40 10-shot forwards": lambda: [model.run(s, head=False) for s in seqs1],
        "40 10-shot packed": lambda: packed.run(model, shot.pack),
        "head, 128 rows": lambda: model.logits(rows),
    }
    best, _ = best_of(fns, args.repeats)
    out = {"tokens": {"prompt": int(prompt.size), "zero-shot rows": int(zero.pack.tokens.size),
                      "10-shot rows": int(shot.pack.tokens.size)}, "seconds": best}
    for k, v in best.items():
        print(f"{k:28s} {v:8.3f} s")
    out["ratios"] = {"absorb / forward (no head)": best["prompt absorb"] / best["prompt forward, no head"],
                     "zero-shot: separate / packed": best["40 zero-shot forwards"] / best["40 zero-shot packed"],
                     "10-shot: separate / packed": best["40 10-shot forwards"] / best["40 10-shot packed"]}
    for k, v in out["ratios"].items():
        print(f"{k:28s} {v:8.2f}")
    t0 = time.perf_counter()
    b, ref, held0, streams = baselines(model, bos, encode, sp, cfg)
    t1 = time.perf_counter()
    condense_seed(model, bos, encode, sp, cfg, ref, held0, streams)
    t2 = time.perf_counter()
    out["study unit"] = {"baselines": t1 - t0, "condensation": t2 - t1}
    n_learned = 7
    total = 27 * (t1 - t0) + 7 * 3 * (t2 - t1)
    print(f"one (task, seed): baselines {t1 - t0:.1f} s, condensation {t2 - t1:.1f} s; "
          f"the full study (27 baselines, {n_learned} learned tasks x 3 seeds) ~ {total / 60:.0f} min + loading")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
