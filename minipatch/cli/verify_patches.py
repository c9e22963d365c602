"""``python -m minipatch verify-patches CHECKPOINT PATCHES.npz``: check another implementation's patches.

    python -m minipatch verify-patches CKPT PATCHES.npz --tokens 2,17,33,...   # or --tokens REF.npz
    python -m minipatch verify-patches CKPT PATCHES.npz --json

PATCHES.npz is a patch file (FORMATS.md, :mod:`minipatch.patchfile`); the tokens are the
with-context sequence (``--tokens``, else the file's ``input_ids``), the context the file's
``context`` (else ``--context``, else every position not kept). What is checked and the
verdicts: :mod:`minipatch.audit.verify` (:func:`~minipatch.audit.verify.verify_file`). Exit status as ``audit``: 0 ok, 1 not
ok, 2 bad input (a named error).
"""
from __future__ import annotations

from pathlib import Path

from ..audit.verify import verify_file
from ..errors import MinipatchError, ModelFileError
from .audit import closing_lines, divergence_line, fail, to_json
from .reference import parse_positions, read_tokens

KEYS = ("arch", "ok", "verdict", "logits_max_rel_err", "unpatched_max_rel_err", "control_ok",
        "first_divergent_layer", "first_divergent_sublayer", "sublayer_rel_err", "sublayer_before",
        "sublayer_rel_err_before", "culprit", "max_rank", "rank_ok", "layers", "hidden_state_rel_errs",
        "sublayer_rel_errs", "notes")
"""The keys of ``--json`` (always present; null where a check does not apply)."""


def format_report(r):
    """The verification ``r`` as a short human-readable report (str)."""
    f = lambda v: "-" if v is None else f"{v:.1e}"
    lines = [f"verify-patches {r['patches']} on {r['path']} ({r['arch']}, {r['dtype']}, rtol {r['rtol']:g}, "
             f"kept {len(r['kept_positions'])}, context {len(r['context_positions'])})",
             f"  {r['output']}: patched vs with-context {f(r['logits_max_rel_err'])}; unpatched (control) "
             f"{f(r['unpatched_max_rel_err'])}",
             "  hidden states (rel err): " + " ".join(f"{i}:{e:.1e}" for i, e in enumerate(r["hidden_state_rel_errs"]))]
    lines.append(divergence_line(r, f))
    lines.append(f"  max rank of a weight patch: {r['max_rank']}")
    for lay in r["layers"]:
        ranks = ", ".join(f"{k} (rank {v['rank']})" if v["rank"] is not None else k for k, v in lay["params"].items())
        lines.append(f"  layer {lay['layer']}: {lay['verdict']} [{ranks}]")
    return "\n".join(lines + closing_lines(r, r["verdict"]))


def add_parser(sub):
    """Register the ``verify-patches`` subcommand."""
    p = sub.add_parser("verify-patches", help="check another implementation's patch file on a checkpoint")
    p.add_argument("checkpoint", help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument("patches", help="patch file (.npz, FORMATS.md)")
    p.add_argument("--tokens", help="with-context token ids '2,17,...' or an .npz with input_ids "
                                    "(default: the patch file's input_ids)")
    p.add_argument("--context", help="absorbed positions 'start:stop' or '1,2' (default: the file's, else the rest)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rtol", type=float, default=1e-9, help="bar for streams and logits (default 1e-9)")
    p.add_argument("--patch-rtol", type=float, default=1e-6,
                   help="bar for a patch to equal one of minipatch's constructions (default 1e-6)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.set_defaults(func=run)
    return p


def run(args):
    """Run ``verify-patches``: exit status 0 if ok, 1 if not ok, 2 on bad input."""
    try:
        try:
            ids = None if args.tokens is None else read_tokens(args.tokens)
            ctx = None if args.context is None else parse_positions(args.context)
            r = verify_file(Path(args.checkpoint), Path(args.patches), ids, ctx, args.dtype, args.rtol,
                            args.patch_rtol)
        except MemoryError:
            raise ModelFileError(f"{args.patches}: verifying these patches needs more memory than this machine "
                                 "has") from None
    except (MinipatchError, OSError, ValueError) as e:
        return fail(args, "verify-patches", e)
    if args.json:
        print(to_json({k: r[k] for k in KEYS}))
    else:
        print(format_report(r))
    return 0 if r["ok"] else 1
