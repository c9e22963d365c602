"""Build the patch-file fixtures: another implementation's patches, as verify-patches reads them.

    python tools/make_patch_fixtures.py

Writes, next to the tiny Gemma 3 model (tests/fixtures/gemma3_text/), two patch files (FORMATS.md)
for its fixture input (24 tokens, context 1..15), each with ``input_ids`` and ``context`` so that
``python -m minipatch verify-patches tests/fixtures/gemma3_text FILE`` needs nothing else:

- ``patches_m6a.npz``: correct, by M6a (minipatch's ``method='auto'`` picks M6d): exact, "a
  different valid construction";
- ``patches_m6a_no_eps.npz``: M6a whose scale patch ignores the post-norm's epsilon: wrong from
  layer 0's post-MLP norm on, parameter ``mlp_post_norm.weight``.

Both are unbound (no origin), as another implementation's would be; the builders are
minipatch/audit/flaws.py. numpy only (no torch); deterministic. tests/test_readme_audit.py checks
that a rebuild agrees with the committed files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minipatch as mp  # noqa: E402
from minipatch.audit.flaws import m6a_without_eps, other_method  # noqa: E402

FOLDER = ROOT / "tests" / "fixtures" / "gemma3_text"
FILES = {"patches_m6a.npz": lambda m, i, c: other_method(m, i, c, "m6a"),
         "patches_m6a_no_eps.npz": m6a_without_eps}


def build(name):
    """(Patches, input_ids, context) of the fixture ``name``, freshly made."""
    model = mp.load(FOLDER)
    with np.load(FOLDER / "reference.npz", allow_pickle=False) as z:
        ids, ctx = z["input_ids"], z["context_positions"]
    return FILES[name](model, ids, ctx), ids, ctx


def main():
    for name in FILES:
        patches, ids, ctx = build(name)
        path = patches.save(FOLDER / name, context=ctx, input_ids=ids)
        print(f"{path.relative_to(ROOT)} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
