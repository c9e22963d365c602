"""Build audit references from *stock* Hugging Face transformers in float64 (deliberately not true fp64).

Run with the reference venv (torch 2.13.0+cpu, transformers 5.23.0):

    /work/venv-ref/bin/python tools/make_audit_reference.py [name ...]

For each tiny fixture model (default: ``gemma3_text`` and ``llama`` in tests/fixtures/) it loads the
checkpoint with the stock ``from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")``,
with NO runtime patches (``minipatch.hf_reference.make_reference(..., stock=True)``, the forward of
``python -m minipatch reference --stock``), runs ``model(ids, attention_mask=ones, use_cache=False,
output_hidden_states=True)`` on the fixture's ``input_ids`` and writes
``tests/fixtures/<name>/reference_stock_fp64.npz`` (next to its model) with
``input_ids`` [T], ``logits`` [T, V], ``hidden_states`` [L+1, T, D] (HF layout) and
``context_positions`` (1..15). Stock transformers still rounds RMSNorm, RoPE and the eager softmax to
float32 in a float64 model (tests/fixtures/HF_FIXTURES.md section 3), so these references differ from a true
float64 forward by about 1e-7 relative: ``python -m minipatch audit`` must flag them at rtol 1e-9 and
accept them at rtol 1e-5.

The float32 parts of the stock forward depend on the CPU kernels torch picks (AVX2 vs AVX-512 float32
exp/rsqrt/reductions differ in the last bits: about 1e-6 in the logits), while a true float64 forward does
not. So the script pins ``ATEN_CPU_CAPABILITY=avx2`` (override it in the environment) unless it is already
set: with it, the stored logits equal the fixture's ``logits_stock`` bit for bit, and a rebuild
gives byte-identical files.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")   # before torch is imported; see the docstring
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's minipatch
from minipatch.hf_reference import make_reference  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("gemma3_text", "llama")


def source_folder(name):
    """The fixture folder tests/fixtures/<name>."""
    folder = ROOT / "tests" / "fixtures" / name
    if not (folder / "model.safetensors").exists():
        raise SystemExit(f"no fixture folder {folder}")
    return folder


def stock_fp64(folder):
    """Stock HF float64 forward of the fixture's input_ids: (arrays to save, summary dict).

    The forward is the package's (``minipatch.hf_reference.make_reference(..., stock=True)``, the
    machinery of ``python -m minipatch reference --stock``); these files keep its four core keys.
    """
    with np.load(folder / "reference.npz", allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    made = make_reference(folder, ref["input_ids"], context=ref["context_positions"], stock=True)
    logits, hs = made["logits"], made["hidden_states"]
    arrays = {"input_ids": ref["input_ids"].astype(np.int64), "logits": logits, "hidden_states": hs,
              "context_positions": ref["context_positions"].astype(np.int64)}
    scale = np.max(np.abs(ref["logits"]))
    summary = {
        "class": json.loads((folder / "config.json").read_text())["architectures"][0],
        "logits_dtype": str(logits.dtype),
        "islands": [str(s) for s in made["islands"]],
        "same_as_fixture_logits_stock": bool(np.array_equal(logits, ref.get("logits_stock", logits * np.nan))),
        "vs_true_fp64_logits_rel": float(np.max(np.abs(logits - ref["logits"])) / scale),
        "vs_true_fp64_hidden_rel": [float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                                    for a, b in zip(hs, ref["hidden_states"])],
    }
    return arrays, summary


def save_npz(path, arrays):
    """Write an uncompressed npz deterministically (fixed member order, no timestamps beyond zip's)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=list(DEFAULT))
    args = p.parse_args(argv)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for name in args.names:
        folder = source_folder(name)
        arrays, s = stock_fp64(folder)
        path = folder / "reference_stock_fp64.npz"
        save_npz(path, arrays)
        print(f"{path} ({path.stat().st_size} bytes): {s['class']}, logits {s['logits_dtype']}, "
              f"identical to fixture logits_stock: {s['same_as_fixture_logits_stock']}")
        print("  float32 islands: " + "; ".join(s["islands"]))
        print(f"  vs true fp64: logits rel {s['vs_true_fp64_logits_rel']:.2e}; hidden states rel "
              + " ".join(f"{i}:{e:.1e}" for i, e in enumerate(s["vs_true_fp64_hidden_rel"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
