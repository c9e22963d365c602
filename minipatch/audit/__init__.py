"""The audit kit: check another implementation against minipatch (README, "Auditing").

    python -m minipatch reference CHECKPOINT --out REF.npz --tokens 2,17,...   # Hugging Face -> REF.npz
    python -m minipatch audit CHECKPOINT --reference REF.npz                   # first diverging sublayer
    python -m minipatch verify-patches CHECKPOINT PATCHES.npz --tokens ...     # another's patches

Modules: :mod:`.reference` (the reference file), :mod:`.sublayers` (the sublayer list and the
divergence scan), :mod:`.compare` (the audit), :mod:`.cli` (its command), :mod:`.verify` and
:mod:`.constructions` (verify-patches), :mod:`.verify_cli`, :mod:`.reference_cli` (the
``reference`` command; Hugging Face itself is driven by :mod:`minipatch.hf_reference`). File
layouts: FORMATS.md.
"""
from __future__ import annotations

from .cli import add_parser, format_report, run
from .compare import KEYS, audit
from .reference import load_reference, read_reference
from .sublayers import SUBLAYERS


def add_kit_parsers(sub):
    """Register ``reference`` and ``verify-patches`` (``audit`` is :func:`add_parser`)."""
    from .reference_cli import add_parser as add_reference
    from .verify_cli import add_parser as add_verify

    add_reference(sub)
    add_verify(sub)


__all__ = ["KEYS", "SUBLAYERS", "audit", "read_reference", "load_reference", "format_report", "add_parser",
           "run", "add_kit_parsers"]
