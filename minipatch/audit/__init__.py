"""The audit kit: check another implementation against minipatch (README, "Auditing").

    python -m minipatch reference CHECKPOINT --out REF.npz --tokens 2,17,...   # Hugging Face -> REF.npz
    python -m minipatch audit CHECKPOINT --reference REF.npz                   # first diverging sublayer
    python -m minipatch verify-patches CHECKPOINT PATCHES.npz --tokens ...     # another's patches

Modules: :mod:`.reference` (the reference file), :mod:`.sublayers` (the sublayer list and the
divergence scan), :mod:`.compare` (the audit), :mod:`.verify` and :mod:`.constructions`
(verify-patches), :mod:`.flaws` (patch sets as others might make them). Hugging Face itself is
driven by :mod:`minipatch.hf_reference`; the commands are :mod:`minipatch.cli.audit`,
:mod:`minipatch.cli.reference` and :mod:`minipatch.cli.verify_patches`. File layouts: FORMATS.md.
"""
from __future__ import annotations

from .compare import KEYS, audit
from .reference import load_reference, read_reference
from .sublayers import SUBLAYERS
from .verify import verify, verify_file

__all__ = ["KEYS", "SUBLAYERS", "audit", "read_reference", "load_reference", "verify", "verify_file"]
