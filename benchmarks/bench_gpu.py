"""Forward, absorb and absorbed greedy on a GPU with CuPy (MATH.md M7; the backend pattern).

    python benchmarks/bench_gpu.py --json figures/bench_gpu.json          # on a machine with CuPy
    python benchmarks/bench_gpu.py --backend numpy --tokens 64 --n-layers 2   # a dry run on CPU

A model with Gemma 3 270M's shapes and random weights (``minipatch.models.gemma3_270m_sized``,
float32; timing does not depend on the values), moved to the GPU with ``model.to(cupy)``. For
each T: the with-context forward (logits), ``absorb`` of the first half as context (closed
loop, the default), with its exactness (patched vs with-context logits at the kept tokens,
float32 bar 1e-4) and the negative control; then plain and absorbed (``'all_but_last'``)
greedy per token after a 512-token prompt. Best of ``--repeats`` interleaved rounds after a
warm-up, each timed call synchronised with the device. Peak GPU memory from CuPy's pool.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import minipatch as mp
from _timing import best_of, write_json  # benchmarks/_timing.py (the script's folder is on sys.path)
from minipatch.backend import to_numpy
from minipatch.metrics import rel_err
from minipatch.models import gemma3_270m_sized


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cupy", choices=("cupy", "numpy"))
    ap.add_argument("--tokens", default="512,1024,4096", help="comma-separated T")
    ap.add_argument("--n-layers", type=int, default=18)
    ap.add_argument("--n-new", type=int, default=16, help="greedy tokens per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = gemma3_270m_sized(seed=0, dtype=np.float32, n_layers=args.n_layers)
    if args.backend == "cupy":
        import cupy

        model = model.to(cupy)
        sync = cupy.cuda.get_current_stream().synchronize
        pool = cupy.get_default_memory_pool()
        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        sync, pool, device = (lambda: None), None, "CPU (numpy)"
    print(f"{device}: {model}", flush=True)
    rng = np.random.default_rng(0)
    out = {"device": device, "n_layers": args.n_layers, "dtype": "float32", "sizes": []}
    for T in (int(t) for t in args.tokens.split(",")):
        tok = rng.integers(0, model.cfg.vocab_size, T)
        ctx = np.arange(T // 2)
        if pool is not None:
            pool.free_all_blocks()
        best, res = best_of({"forward": lambda: model.forward(tok), "absorb": lambda: mp.absorb(model, tok, ctx)},
                            args.repeats, sync)
        r = res["absorb"]
        full = to_numpy(model.forward(tok))[r.kept]
        err = rel_err(mp.patched_forward(model, tok, r), full)
        control = rel_err(model.forward(tok[r.kept], positions=r.kept), full)
        row = dict(T=T, forward_s=best["forward"], absorb_s=best["absorb"], ratio=best["absorb"] / best["forward"],
                   rel_err=err, control=control,
                   pool_mb=None if pool is None else pool.total_bytes() / 2**20)
        out["sizes"].append(row)
        print(f"T={T}: forward {best['forward']:.3f} s, absorb {best['absorb']:.3f} s "
              f"({row['ratio']:.2f}x); patched vs with-context {err:.1e} (control {control:.2f})", flush=True)
        assert err <= 1e-4 < control, "not exact on this backend"
    prompt = rng.integers(0, model.cfg.vocab_size, min(512, int(args.tokens.split(",")[0])))
    n = args.n_new
    best, _ = best_of({"plain": lambda: mp.greedy(model, prompt, n),
                       "plain_1": lambda: mp.greedy(model, prompt, 1),
                       "absorbed": lambda: mp.greedy(model, prompt, n, context="all_but_last"),
                       "absorbed_1": lambda: mp.greedy(model, prompt, 1, context="all_but_last")}, args.repeats, sync)
    per = {k: (best[k] - best[k + "_1"]) / (n - 1) for k in ("plain", "absorbed")}
    out["greedy_per_token_s"] = dict(per, ratio=per["absorbed"] / per["plain"], prompt=len(prompt))
    print(f"greedy after {len(prompt)} tokens, per token: plain {per['plain'] * 1e3:.1f} ms, absorbed "
          f"{per['absorbed'] * 1e3:.1f} ms ({per['absorbed'] / per['plain']:.2f}x)", flush=True)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
