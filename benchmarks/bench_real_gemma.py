"""Benchmark the real Gemma 3 270M in float32: forward, absorb (MATH.md M7), and Hugging Face's forward.

    python benchmarks/bench_real_gemma.py                                   # 512-token prompt
    python benchmarks/bench_real_gemma.py --json figures/bench_real_gemma.json
    python benchmarks/bench_real_gemma.py --hf-python /work/venv-ref/bin/python

Prints, in one run: the time of our float32 forward on a 512-token prompt (all logits), of
``absorb`` with context = positions 1..T/2-1 (BOS and the second half kept), of the patched
forward, their ratios and the patched-vs-with-context error. Then Hugging Face's float32
forward of the same token ids (``from_pretrained(dir, gguf_file=..., dtype=torch.float32)``,
offline): in this interpreter if torch and transformers import, else in ``--hf-python``
(another interpreter that has them, run as a child process on the same machine right after
ours), else it says it is skipped. Timings: best of ``--repeats`` interleaved rounds after
one warm-up. torch runs on as many threads as numpy's BLAS (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _timing import best_of  # benchmarks/_timing.py (the script's folder is on sys.path)

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
        "produce books faster and more cheaply than scribes. Within fifty years presses operated in more "
        "than two hundred European cities, and the number of books in circulation grew from thousands to "
        "millions. Scholars argue about the consequences: the spread of literacy, the Reformation, the "
        "scientific revolution and the standardisation of languages all owe something to print, and "
        "historians still debate how much. What is certain is that the cost of a page fell by a factor of "
        "several hundred, that pamphlets and newspapers followed within a few generations, and that")


def blas_threads():
    """The thread count of numpy's BLAS (threadpoolctl), else the CPU count."""
    try:
        from threadpoolctl import threadpool_info

        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    except (ImportError, ValueError):
        return os.cpu_count()


def hf_time(gguf_path, ids, repeats, threads=None):
    """Hugging Face float32 forward of ``ids`` (one batch): dict with seconds, threads, versions."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    threads = threads or blas_threads()
    torch.set_num_threads(threads)        # the threads numpy's BLAS uses: a like-for-like comparison
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - t0
    x = torch.tensor([ids], dtype=torch.long)

    def fwd():
        with torch.no_grad():
            return model(x, use_cache=False).logits

    best, _ = best_of({"hf": fwd}, repeats)
    import transformers

    return dict(forward_s=best["hf"], load_s=load, threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, attn=model.config._attn_implementation)


def ours(args):
    import numpy as np

    try:
        import minipatch
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
        import minipatch
    from minipatch.io.gguf import gemma3_270m_path, read_gguf_metadata
    from minipatch.io.tokenizer import encode, tokenizer_from_gguf

    path = str(gemma3_270m_path())
    t0 = time.perf_counter()
    model = minipatch.load(path, dtype="float32")
    t_load = time.perf_counter() - t0
    tok = tokenizer_from_gguf(read_gguf_metadata(path))
    ids = np.asarray(encode(tok, " ".join([TEXT] * (1 + args.tokens // 100))), dtype=np.int64)[:args.tokens]
    T = ids.size
    context = np.arange(1, T // 2)
    kept = np.setdiff1d(np.arange(T), context)
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} ({i['num_threads']} threads)" for i in threadpool_info())
    except ImportError:
        blas = "threadpoolctl not installed"
    print(f"Gemma 3 270M float32 (loaded in {t_load:.1f} s); BLAS: {blas}; cores: {os.cpu_count()}")
    print(f"prompt: T={T} tokens; context = positions 1..{T // 2 - 1} ({context.size}), kept = {kept.size}; "
          f"best of {args.repeats} interleaved rounds after a warm-up\n")
    res = minipatch.absorb(model, ids, context)
    best, out = best_of({
        "forward": lambda: model.forward(ids),
        "absorb": lambda: minipatch.absorb(model, ids, context),
        "patched": lambda: minipatch.patched_forward(model, ids, res),
    }, args.repeats)
    ref = np.asarray(out["forward"])[kept].astype(np.float64)
    err = float(np.max(np.abs(np.asarray(out["patched"]) - ref)) / np.max(np.abs(ref)))
    print("time (s)")
    print(f"  forward, all {T} tokens, all logits   {best['forward']:8.3f}")
    print(f"  absorb (M7, auto)                    {best['absorb']:8.3f}   = {best['absorb'] / best['forward']:.2f} x forward")
    print(f"  patched forward ({kept.size} kept tokens)   {best['patched']:8.3f}")
    print(f"  patched vs with-context logits: rel err {err:.2e} (methods: {sorted(set(res.methods))})")
    return path, ids.tolist(), best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="prompt length (the text repeated, then cut; default 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-python", default=os.environ.get("MINIPATCH_HF_PYTHON"),
                    help="an interpreter with torch + transformers (+ gguf, accelerate) for the HF timing")
    ap.add_argument("--json", default=None, help="also write the timings and ratios here")
    ap.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_child:   # child mode: time HF on the ids in the JSON file, print one JSON line
        job = json.load(open(args.hf_child))
        print(json.dumps(hf_time(job["path"], job["ids"], args.repeats)))
        return 0
    path, ids, best = ours(args)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        hf = hf_time(path, ids, args.repeats)
    except ImportError:
        hf = None
        if args.hf_python:
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump({"path": path, "ids": ids}, f)
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            p = subprocess.run([args.hf_python, os.path.abspath(__file__), "--hf-child", f.name,
                                "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
            os.unlink(f.name)
            if p.returncode == 0:
                hf = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                print(f"\nHugging Face: child {args.hf_python} failed:\n{p.stderr[-2000:]}")
    record = dict(T=len(ids), forward_s=best["forward"], absorb_s=best["absorb"], patched_s=best["patched"],
                  absorb_vs_forward=best["absorb"] / best["forward"], hf=hf,
                  ours_vs_hf=None if hf is None else best["forward"] / hf["forward_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if hf is None:
        if not args.hf_python:
            print("\nHugging Face: skipped (torch/transformers not importable; pass --hf-python)")
        return 0
    print(f"\nHugging Face transformers {hf['transformers']} / torch {hf['torch']} ({hf['threads']} threads, "
          f"attention {hf['attn']}), float32, loaded in {hf['load_s']:.1f} s")
    print(f"  HF forward, all {len(ids)} tokens          {hf['forward_s']:8.3f}")
    print(f"  ours / HF forward                    {best['forward'] / hf['forward_s']:8.2f}")
    print(f"  our absorb / HF forward              {best['absorb'] / hf['forward_s']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
