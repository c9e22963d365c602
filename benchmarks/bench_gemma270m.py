"""Benchmark absorb (MATH.md M7) on a model with Gemma 3 270M's shapes and random weights.

    python benchmarks/bench_gemma270m.py                       # float32, 512 tokens
    python benchmarks/bench_gemma270m.py --dtype float64 --tokens 256
    python benchmarks/bench_gemma270m.py --profile             # + where the time goes

Prints, in one run: the time of a with-context forward (all T tokens), of ``absorb``, of the
patched forward (kept tokens, with patches) and of a plain forward (kept tokens, no
patches), their ratios, the forward's achieved GFLOP/s (FLOPs counted analytically below)
against float32/float64 matmuls of the forward's own shapes measured in the same run, and
the patched-vs-with-context logit error. Timings are the best of ``--repeats`` interleaved
rounds (each operation once per round) after one warm-up call. Thread counts are left to the
BLAS defaults; the BLAS in use is printed.

Targets: absorb <= 2.0x one forward; patched forward <= 1.2x plain;
forward >= 50% of the measured matmul rate; and the patched logits within MATH.md section 8's
tolerance (1e-4 relative in float32, 1e-10 in float64). Exit status 1 if any is missed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import sys
import time

import numpy as np

try:
    import minipatch
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import minipatch
from minipatch.models import gemma3_270m_sized

from _timing import best_of  # benchmarks/_timing.py (the script's folder is on sys.path)


def forward_flops(cfg, positions, masked=False):
    """Multiply-add FLOPs (2 per MAC) of one forward on ``positions``, matmuls only.

    Projections q/k/v/o, attention scores (q k^T) and values (p v), gate/up/down, the
    LM head. ``masked=False`` counts the dense T x S score and value products the code
    performs; ``masked=True`` counts only the visible (query, key) pairs of each layer's
    causal / sliding-window mask (the useful work). Norms, RoPE, softmax and GELU are
    elementwise (O(T D)) and not counted.
    """
    pos = np.asarray(positions)
    T = pos.size
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_ff, cfg.vocab_size
    proj = 2 * T * D * (N * H + 2 * K * H) + 2 * T * N * H * D
    mlp = 2 * T * D * F * 2 + 2 * T * F * D
    total = 0
    for layer in range(cfg.n_layers):
        if masked:
            vis = pos[None, :] <= pos[:, None]
            w = cfg.window(layer)
            if w:
                vis &= (pos[:, None] - pos[None, :]) < w
            pairs = int(vis.sum())
        else:
            pairs = T * T
        total += proj + mlp + 2 * 2 * N * H * pairs
    return total + 2 * T * D * V


def matmul(shape_a, shape_w, dtype, rng):
    """A callable computing ``a @ w.mT`` with a [M, K], w [N, K] (the forward's weight layout),
    and its FLOP count."""
    a = rng.standard_normal(shape_a).astype(dtype)
    w = rng.standard_normal(shape_w).astype(dtype)
    return (lambda: a @ w.T), 2 * shape_a[0] * shape_a[1] * shape_w[0]


def blas_info():
    """One line naming numpy's BLAS and its thread count (if threadpoolctl is installed)."""
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    line = f"{cfg.get('name')} {cfg.get('version')}"
    try:
        from threadpoolctl import threadpool_info

        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if info:
            line += f", {info[0].get('num_threads')} threads ({info[0].get('architecture')})"
    except ImportError:
        env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
        line += f", threads: default (no thread env vars set: {env or 'none'}; os.cpu_count()={os.cpu_count()})"
    return line


def profile(fn, top):
    """cProfile ``fn`` once; the ``top`` functions by own time, as text."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    lines = s.getvalue().splitlines()
    start = next(i for i, l in enumerate(lines) if "ncalls" in l)
    head = [l for l in lines[:start] if "function calls" in l]
    return "\n".join(head + lines[start:start + top + 1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--context", default=None,
                    help="context positions as 'a:b' (half-open); default 1:T/2 (BOS and the rest kept)")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also cProfile one forward and one absorb")
    ap.add_argument("--top", type=int, default=18, help="rows of each profile")
    args = ap.parse_args(argv)

    dtype = np.dtype(args.dtype)
    T = args.tokens
    a, b = (1, T // 2) if args.context is None else map(int, args.context.split(":"))
    context = np.arange(a, b)

    print(f"python {platform.python_version()}, numpy {np.__version__}, minipatch {minipatch.__version__}")
    print(f"BLAS: {blas_info()}")
    t0 = time.perf_counter()
    model = gemma3_270m_sized(seed=args.seed, dtype=dtype, n_layers=args.layers)
    cfg = model.cfg
    print(f"model: gemma3_270m_sized {dtype.name}, L={cfg.n_layers} D={cfg.d_model} F={cfg.d_ff} "
          f"N={cfg.n_heads} K={cfg.n_kv_heads} H={cfg.d_head} V={cfg.vocab_size}, "
          f"{model.n_params() / 1e6:.1f}M params (built in {time.perf_counter() - t0:.1f} s)")
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, T)
    tokens[0] = 2  # a BOS-like id
    kept = np.setdiff1d(np.arange(T), context)
    print(f"tokens: T={T}, context = positions {a}..{b - 1} ({context.size}), kept = {kept.size} "
          f"(BOS + {kept.size - 1}), repeats: best of {args.repeats} interleaved rounds after a warm-up\n")

    res = minipatch.absorb(model, tokens, context, method=args.method)
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    mm_mlp, fl_mlp = matmul((T, D), (F, D), dtype, rng)
    mm_head, fl_head = matmul((T, D), (V, D), dtype, rng)
    best, out = best_of({
        "ctx": lambda: model.forward(tokens),
        "absorb": lambda: minipatch.absorb(model, tokens, context, method=args.method),
        "patched": lambda: minipatch.patched_forward(model, tokens, res),
        "plain": lambda: model.forward(tokens[kept], positions=kept),
        "mm_mlp": mm_mlp,
        "mm_head": mm_head,
    }, args.repeats)
    t_ctx, t_abs, t_pat, t_plain = best["ctx"], best["absorb"], best["patched"], best["plain"]
    logits_ctx, res, logits_pat, logits_plain = out["ctx"], out["absorb"], out["patched"], out["plain"]
    del out

    ref = logits_ctx[kept].astype(np.float64)
    scale = np.max(np.abs(ref))
    err = float(np.max(np.abs(logits_pat - ref)) / scale)
    ctrl = float(np.max(np.abs(logits_plain - ref)) / scale)
    agree = float(np.mean(np.argmax(logits_pat, -1) == np.argmax(ref, -1)))

    fl = forward_flops(cfg, np.arange(T))
    fl_masked = forward_flops(cfg, np.arange(T), masked=True)
    head = 2 * T * cfg.d_model * cfg.vocab_size
    rate_mlp, rate_head = fl_mlp / best["mm_mlp"] / 1e9, fl_head / best["mm_head"] / 1e9
    rate = fl / t_ctx / 1e9
    rate_m = fl_masked / t_ctx / 1e9

    print("timings (s)")
    print(f"  with-context forward  (T={T:4d})      {t_ctx:8.3f}")
    print(f"  absorb                (method={'/'.join(sorted(set(res.methods)))})   {t_abs:8.3f}")
    print(f"  patched forward       (T={kept.size:4d})      {t_pat:8.3f}")
    print(f"  plain forward         (T={kept.size:4d})      {t_plain:8.3f}")
    print("ratios")
    ok1, ok2 = t_abs / t_ctx <= 2.0, t_pat / t_plain <= 1.2
    print(f"  absorb / forward          {t_abs / t_ctx:6.3f}   (target <= 2.0: {'PASS' if ok1 else 'MISS'})")
    print(f"  patched / plain           {t_pat / t_plain:6.3f}   (target <= 1.2: {'PASS' if ok2 else 'MISS'})")
    print("throughput of the with-context forward")
    print(f"  FLOPs (dense T^2 attention as computed) {fl / 1e9:8.1f} G   "
          f"(head {head / fl:.0%}; masked/useful {fl_masked / 1e9:.1f} G)")
    print(f"  achieved                          {rate:8.1f} GFLOP/s   (useful: {rate_m:.1f})")
    print(f"  {dtype.name} matmul [{T},{D}]x[{D},{F}]      {rate_mlp:8.1f} GFLOP/s")
    print(f"  {dtype.name} matmul [{T},{D}]x[{D},{V}]    {rate_head:8.1f} GFLOP/s")
    ok3 = rate >= 0.5 * max(rate_mlp, rate_head)
    print(f"  forward / MLP-shaped matmul       {rate / rate_mlp:8.1%}")
    print(f"  forward / head-shaped matmul      {rate / rate_head:8.1%}   "
          f"(target: >= 50% of the faster matmul: {'PASS' if ok3 else 'MISS'})")
    tol = 1e-4 if dtype == np.float32 else 1e-10          # MATH.md section 8
    ok4 = err <= tol
    print("exactness (kept positions)")
    print(f"  patched vs with-context logits: rel err {err:.2e} (target <= {tol:g}: {'PASS' if ok4 else 'MISS'}), "
          f"top-1 agreement {agree:.1%}; unpatched control {ctrl:.2e}")

    if args.profile:
        print("\n=== cProfile: with-context forward (own time; '@' is billed to its caller) ===")
        print(profile(lambda: model.forward(tokens), args.top))
        print("\n=== cProfile: absorb ===")
        print(profile(lambda: minipatch.absorb(model, tokens, context, method=args.method), args.top))
        print("\n=== cProfile: patched forward ===")
        print(profile(lambda: minipatch.patched_forward(model, tokens, res), args.top))
    return 0 if (ok1 and ok2 and ok3 and ok4) else 1


if __name__ == "__main__":
    sys.exit(main())
