"""``python -m minipatch reference CHECKPOINT --out REF.npz``: a reference file from Hugging Face.

    python -m minipatch reference CKPT --out REF.npz --tokens 2,17,33 --context 1:2   # true float64
    python -m minipatch reference CKPT --out REF.npz --tokens OTHER.npz --stock       # HF as shipped
    python -m minipatch reference CKPT --out REF.npz --prompt "The cat" --dtype float32

Runs transformers on the checkpoint (:func:`minipatch.hf_reference.make_reference`) and writes
the reference file of FORMATS.md: input_ids, logits, hidden_states, every sublayer, the context
positions, and which float32 islands were raised (or, with ``--stock``, found). Then
``python -m minipatch audit CKPT --reference REF.npz`` names the first diverging layer and
sublayer. Exit status: 0 written, 2 bad input (a named error).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError, MinipatchError, ModelFileError
from .audit import fail


def read_tokens(text):
    """Token ids from '2,17,33' or from the ``input_ids`` member of an ``.npz`` (a reference or a
    patch file; read without unpickling)."""
    if text.endswith(".npz"):
        from ..npzfile import check_array, read_npz

        got = read_npz(Path(text), lambda k: k == "input_ids", "token file")
        if "input_ids" not in got:
            raise ModelFileError(f"{text}: no input_ids member")
        ids = got["input_ids"]
        ids = ids[0] if ids.ndim == 2 and ids.shape[0] == 1 else ids
        check_array(text, "input_ids", ids, 1, "iu")
        return ids.astype(np.int64)
    try:
        return np.array([int(t) for t in text.split(",") if t.strip()], dtype=np.int64)
    except ValueError:
        raise InputError(f"--tokens must be comma-separated integers or an .npz with input_ids, got {text!r}") \
            from None


def prompt_tokens(checkpoint, prompt):
    """The checkpoint's own tokenizer (transformers, no remote code) applied to ``prompt``."""
    from ..hf_reference import _import

    _, transformers = _import()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{checkpoint}: no usable tokenizer for --prompt ({type(e).__name__}: {e}); "
                         "pass --tokens instead") from None
    return np.asarray(tok(prompt)["input_ids"], dtype=np.int64)


def add_parser(sub):
    """Register the ``reference`` subcommand."""
    p = sub.add_parser("reference", help="run Hugging Face transformers on a checkpoint and write REF.npz "
                                         "(every hidden state and sublayer) for the audit")
    p.add_argument("checkpoint", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="the reference file to write (.npz)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="token ids '2,17,33' or an .npz with input_ids")
    src.add_argument("--prompt", help="text, tokenized by the checkpoint's own tokenizer")
    p.add_argument("--context", help="positions to absorb, 'start:stop' or '1,2,5' (stored for the audit's "
                                     "theorem check)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--stock", action="store_true", help="keep Hugging Face as shipped (float32 islands in float64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def run(args):
    """Run ``reference``: exit status 0 when the file is written, 2 on bad input."""
    from ..hf_reference import make_reference
    from ..npzfile import write_npz

    try:
        ids = read_tokens(args.tokens) if args.tokens is not None else prompt_tokens(args.checkpoint, args.prompt)
        ctx = None if args.context is None else parse_positions(args.context)
        bar = not args.json and sys.stderr.isatty()         # a progress bar only on a terminal
        arrays = make_reference(Path(args.checkpoint), ids, ctx, args.dtype, args.stock, progress=bar)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = write_npz(Path(args.out), arrays)
    except (MinipatchError, OSError, ValueError) as e:
        return fail(args, "reference", e)
    kind = str(arrays["reference_kind"][()])
    subs = [k.split(".", 1)[1] for k in arrays if k.startswith("sublayers.")]
    islands = [str(s) for s in arrays["islands"]]
    if args.json:
        print(json.dumps({"ok": True, "out": str(out), "reference_kind": kind, "tokens": int(ids.size),
                          "layers": int(arrays["hidden_states"].shape[0] - 1), "sublayers": subs,
                          "islands": islands}))
        return 0
    verb = "raised to float64" if kind == "true-float64" else "left in float32"
    print(f"wrote {out} ({kind}): {ids.size} tokens, {arrays['hidden_states'].shape[0] - 1} layers, "
          f"sublayers {', '.join(subs)}")
    if islands:
        print(f"Hugging Face float32 islands {verb}: " + "; ".join(islands))
    print(f"next: python -m minipatch audit {args.checkpoint} --reference {out}")
    return 0


def parse_positions(text, what="--context"):
    """Positions from '1:16' (a range, end excluded) or '1,2,5' (InputError otherwise)."""
    try:
        if ":" in text:
            lo, hi = text.split(":")
            return np.arange(int(lo), int(hi), dtype=np.int64)
        return np.array([int(t) for t in text.split(",") if t.strip()], dtype=np.int64)
    except ValueError:
        raise InputError(f"{what} must be 'start:stop' or comma-separated integers, got {text!r}") from None
