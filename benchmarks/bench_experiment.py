"""The generation experiment's two engines against each other, within one run (MATH.md M7).

    python benchmarks/bench_experiment.py                         # 2 prompts x 5 tokens, float32
    python benchmarks/bench_experiment.py --prompts 5 --n-new 20 --dtype float64 --repeats 1
    python benchmarks/bench_experiment.py --json figures/bench_experiment.json

On the real Gemma 3 270M: ``run_experiment(engine='lockstep')`` (every run of a dtype advanced
together, :mod:`minipatch.lockstep`) against ``engine='single'`` (each run alone through
``minipatch.greedy``, the KV-cached per-run path), on the same prompts, methods M6a-M6d and
both M7 orders; best of ``--repeats`` interleaved rounds. It prints both times, their ratio,
and checks that the engines give the same tokens for every well-conditioned run (M6c and M6d
in closed loop) and both refuse M6b (no witness on this model).
"""
from __future__ import annotations

import argparse

from _timing import best_of, write_json  # benchmarks/_timing.py (the script's folder is on sys.path)
from minipatch import load
from minipatch.experiment import METHODS, ORDERS, PROMPTS, run_experiment
from minipatch.io.gguf import gemma3_270m_path, read_gguf_metadata
from minipatch.io.tokenizer import tokenizer_from_gguf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="how many of the five prompts (default 2)")
    ap.add_argument("--n-new", type=int, default=5, help="tokens per prompt (default 5)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)

    path = gemma3_270m_path()
    model = load(path, dtype="float64")
    tok = tokenizer_from_gguf(read_gguf_metadata(path))
    kw = dict(n_new=args.n_new, dtypes=(args.dtype,), methods=METHODS, orders=ORDERS, progress=False)
    prompts = list(PROMPTS[:args.prompts])
    best, out = best_of({e: (lambda e=e: run_experiment(model, tok, prompts, engine=e, **kw))
                         for e in ("lockstep", "single")}, args.repeats)
    a, b = out["lockstep"]["runs"], out["single"]["runs"]
    steady = [(x, y) for x, y in zip(a, b) if x["order"] == "closed" and x["method"] in ("m6c", "m6d")]
    assert all(x["tokens"] == y["tokens"] for x, y in steady), "the engines disagree on a well-conditioned run"
    assert all(x["error"] and y["error"] for x, y in zip(a, b) if x["method"] == "m6b"), "M6b has no witness here"
    configs = len(METHODS) * len(ORDERS)
    res = dict(prompts=args.prompts, n_new=args.n_new, dtype=args.dtype, configurations=configs,
               lockstep_s=best["lockstep"], single_s=best["single"], ratio=best["single"] / best["lockstep"])
    print(f"{args.prompts} prompts x {args.n_new} tokens x {configs} configurations, {args.dtype}: "
          f"single {best['single']:.1f} s, lockstep {best['lockstep']:.1f} s, "
          f"lockstep is {res['ratio']:.1f}x faster")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
