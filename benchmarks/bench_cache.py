"""KV cache, streaming absorb, closed-loop M7 and the non-finite checks, on the real Gemma 3 270M.

    python benchmarks/bench_cache.py                 # float32; every ratio below, ~5 min on 2 cores
    python benchmarks/bench_cache.py --scaling 128,512,2048,8192 --figure figures/bench_scaling.png
    python benchmarks/bench_cache.py --json output/bench_cache.json

Ratios, each measured in one run (best of ``--repeats`` interleaved rounds after a warm-up,
``benchmarks/_timing.py``):

* **absorbed greedy per token / plain cached greedy per token** (goal <= 2.5): ``greedy(...,
  context='all_but_last')`` (one cached with-context step + one patched single-token pass)
  against ``greedy(...)`` with the context in the prompt, after the same prompt;
* **uncached experiment step / cached experiment step** (the cache's share of the
  experiment's speed-up; the rest is running the runs together, ``bench_experiment.py``):
  the experiment's step as it was before the cache (``absorb`` over the whole prefix, open
  loop, then the patched forward) against :func:`minipatch.absorb_step`, at the same length;
* **absorb / with-context forward** at T = ``--tokens`` (goal <= 1.2), closed and open loop;
* **forward with the non-finite checks / without** (goal <= 1.02);
* with ``--scaling``: forward (hidden states, no head) and absorb time and peak traced
  memory for each T, as a figure.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from _timing import best_of, write_json  # benchmarks/_timing.py (the script's folder is on sys.path)

import minipatch as mp
from minipatch import finite


def per_token(fn, n):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n


def uncached_step(model, seq):
    """The experiment's step before the cache: M7 over the whole prefix, then the patched model."""
    res = mp.absorb(model, seq, np.arange(len(seq) - 1), order="open")
    h = model.run(np.asarray(seq)[res.kept], positions=res.kept, patches=res.patches, head=False)
    return model.logits(h[-1:])


def no_checks():
    """Context manager: the non-finite checks replaced by no-ops (for the overhead ratio)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        import minipatch.model as mm

        saved = (mm.all_finite, finite.check_mean_square)
        mm.all_finite = lambda a: True
        finite.check_mean_square = lambda x, ms: None
        try:
            yield
        finally:
            mm.all_finite, finite.check_mean_square = saved
    return cm()


def scaling(model, sizes, window_ctx=0.5, repeats=2):
    """Per T: peak traced memory of one run of each (which also warms up), then the best time of
    ``repeats`` interleaved untraced rounds (tracemalloc slows allocation-heavy code)."""
    rows = []
    rng = np.random.default_rng(0)
    for T in sizes:
        tok = rng.integers(0, model.cfg.vocab_size, T)
        ctx = np.arange(1, int(T * window_ctx))
        fns = {"forward": lambda: model.run(tok, head=False), "absorb": lambda: mp.absorb(model, tok, ctx)}
        row = {"T": T}
        for name, fn in fns.items():
            tracemalloc.start()
            fn()
            row[name + "_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
        best = {k: float("inf") for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        row.update({k + "_s": v for k, v in best.items()})
        print(f"  T={T:5d}  forward {row['forward_s']:7.2f} s {row['forward_peak_mb']:8.0f} MB   "
              f"absorb {row['absorb_s']:7.2f} s {row['absorb_peak_mb']:8.0f} MB", flush=True)
        rows.append(row)
    return rows


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = [r["T"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.3))
    for name, c in (("forward", "C0"), ("absorb", "C3")):
        a.loglog(T, [r[name + "_s"] for r in rows], "o-", color=c, label=name)
        b.loglog(T, [r[name + "_peak_mb"] for r in rows], "o-", color=c, label=name)
    a.loglog(T, [rows[0]["forward_s"] * t / T[0] for t in T], ":", color="gray", label="∝ T")
    a.set(xlabel="tokens T", ylabel="seconds", title="time (2 cores)")
    b.set(xlabel="tokens T", ylabel="peak traced MB", title="memory (blocked attention)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M float32, hidden states (no head); absorb with context 1..T/2", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=512, help="T for absorb vs forward (default 512)")
    ap.add_argument("--prompt", type=int, default=24, help="prompt length for the greedy ratios")
    ap.add_argument("--n-new", type=int, default=8, help="tokens generated per greedy timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scaling", default="", help="comma-separated T values (e.g. 128,512,2048,8192)")
    ap.add_argument("--figure", default="output/figures/bench_scaling.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from minipatch.io.gguf import gemma3_270m_path

    t0 = time.perf_counter()
    model = mp.load(gemma3_270m_path(), dtype=args.dtype)
    print(f"loaded Gemma 3 270M ({args.dtype}) in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    out = {"dtype": args.dtype}

    # 1. greedy per token: absorbed context vs context in the prompt (both cached)
    prompt = rng.integers(0, model.cfg.vocab_size, args.prompt)
    n = args.n_new
    best, _ = best_of({
        "plain": lambda: mp.greedy(model, prompt, n),
        "absorbed": lambda: mp.greedy(model, prompt, n, context="all_but_last"),
        "plain_prefill": lambda: mp.greedy(model, prompt, 1),
        "absorbed_prefill": lambda: mp.greedy(model, prompt, 1, context="all_but_last"),
    }, args.repeats)
    plain = (best["plain"] - best["plain_prefill"]) / (n - 1)
    absorbed = (best["absorbed"] - best["absorbed_prefill"]) / (n - 1)
    out["greedy_per_token_s"] = {"plain": plain, "absorbed": absorbed, "ratio": absorbed / plain}
    print(f"greedy per token: plain cached {plain * 1e3:.0f} ms, absorbed context {absorbed * 1e3:.0f} ms, "
          f"ratio {absorbed / plain:.2f} (goal <= 2.5)", flush=True)

    # 2. the experiment's step: uncached (absorb over the prefix) vs streamed, at the same length
    seq = list(rng.integers(0, model.cfg.vocab_size, args.prompt + 10))
    _, stream = mp.absorb_prefill(model, seq[:-1], "all_but_last")
    best, _ = best_of({"uncached": lambda: uncached_step(model, seq),
                       "streamed": lambda: mp.absorb_step(model, stream, seq[-1])}, args.repeats)
    out["experiment_step_s"] = dict(best, ratio=best["uncached"] / best["streamed"], length=len(seq))
    print(f"experiment step at T={len(seq)}: uncached {best['uncached']:.2f} s, streamed {best['streamed']:.3f} s, "
          f"speed-up {best['uncached'] / best['streamed']:.0f}x", flush=True)

    # 3. absorb vs one with-context forward (logits included), T tokens
    T = args.tokens
    tok = rng.integers(0, model.cfg.vocab_size, T)
    ctx = np.arange(1, T // 2)
    best, _ = best_of({"forward": lambda: model.forward(tok),
                       "absorb": lambda: mp.absorb(model, tok, ctx),
                       "absorb_open": lambda: mp.absorb(model, tok, ctx, order="open")}, args.repeats)
    out["absorb_vs_forward"] = dict(best, ratio=best["absorb"] / best["forward"],
                                    ratio_open=best["absorb_open"] / best["forward"], T=T)
    print(f"T={T}: forward {best['forward']:.2f} s, absorb closed {best['absorb']:.2f} s "
          f"({best['absorb'] / best['forward']:.2f}x, goal <= 1.2), open {best['absorb_open']:.2f} s "
          f"({best['absorb_open'] / best['forward']:.2f}x)", flush=True)

    # 4. the non-finite checks' overhead
    def unchecked():
        with no_checks():
            return model.forward(tok)

    best, _ = best_of({"checked": lambda: model.forward(tok), "unchecked": unchecked}, args.repeats + 1)
    out["finite_checks"] = dict(best, ratio=best["checked"] / best["unchecked"])
    print(f"non-finite checks: forward {best['checked']:.2f} s vs {best['unchecked']:.2f} s without "
          f"({best['checked'] / best['unchecked']:.3f}x, goal <= 1.02)", flush=True)

    if args.scaling:
        sizes = [int(s) for s in args.scaling.split(",")]
        print("scaling (memory: one traced run; time: best of --repeats untraced rounds):", flush=True)
        out["scaling"] = scaling(model, sizes, repeats=args.repeats)
        print(f"figure: {plot_scaling(out['scaling'], args.figure)}")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
