"""Build a Hugging Face ``tokenizers.Tokenizer`` from the vocabulary inside a GGUF file.

Two GGUF tokenizer kinds (``tokenizer.ggml.model``) are supported:

- ``llama``: a SentencePiece BPE model (Gemma 3). The file holds pieces, scores and
  token types but no merges. SentencePiece BPE merges, at each step, the adjacent pair
  whose concatenation is the highest-scoring piece; a BPE whose merge list is every split
  ``(l, r)`` of every normal piece, ranked by the piece's score, does the same (up to
  tie-breaking between two different splits of one piece present at once). Spaces become ``▁`` (no dummy prefix when ``add_space_prefix`` is false),
  unknown characters fall back to ``<0xNN>`` byte pieces, user-defined pieces (runs of
  newlines, spaces, tabs, HTML tags) are matched whole before BPE, as SentencePiece does.
- ``gpt2``: byte-level BPE with the merges stored in the file (SmolLM2, GPT-2).

Control tokens (``<bos>``, ``<start_of_turn>``, ...) are special tokens. A BOS is added
by the post-processor only where the file says ``tokenizer.ggml.add_bos_token``.
"""

from __future__ import annotations

import numpy as np

from minipatch.errors import ModelFileError

_INSTALL = 'pip install -e ".[gguf]" (in a clone of minipatch)'
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# llama.cpp pre-tokenizer name -> split digits one by one before the byte-level split.
_BYTE_LEVEL_PRE = {None: False, "default": False, "gpt2": False, "smollm": True}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"building a tokenizer needs the tokenizers package: {_INSTALL}") from e
    return tokenizers


def _spm_merges(tokens, scores, types):
    """Merge list for a SentencePiece BPE vocabulary: splits of normal pieces, best piece first."""
    normal = {t for t, ty in zip(tokens, types) if ty == _NORMAL}
    order = sorted((i for i, ty in enumerate(types) if ty == _NORMAL), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        piece = tokens[i]
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in normal and piece[k:] in normal]
    return merges


def _build_spm(tk, meta, tokens, types):
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or scores.dtype.kind != "f" or len(scores) != len(tokens):
        raise ModelFileError("SentencePiece GGUF tokenizer needs one float score per token")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    model = tk.models.BPE(vocab, _spm_merges(tokens, scores.tolist(), types),
                          unk_token=tokens[unk] if unk is not None else None,
                          fuse_unk=True, byte_fallback=True)
    tok = tk.Tokenizer(model)
    norms = [tk.normalizers.Replace(" ", "▁")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        norms.insert(0, tk.normalizers.Prepend("▁"))
    tok.normalizer = tk.normalizers.Sequence(norms)
    decs = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        decs.append(tk.decoders.Strip(" ", 1, 0))
    tok.decoder = tk.decoders.Sequence(decs)
    return tok


def _build_byte_bpe(tk, meta, tokens):
    pairs = []
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list):
        raise ModelFileError("tokenizer.ggml.merges is not a list of strings")
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise ModelFileError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append(tuple(parts))
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _BYTE_LEVEL_PRE:
        raise ModelFileError(f"GGUF tokenizer pre-type {pre!r} is not supported")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = tk.Tokenizer(tk.models.BPE(vocab, pairs))
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [tk.pre_tokenizers.Digits(individual_digits=True)] if _BYTE_LEVEL_PRE[pre] else []
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(steps + [byte_level])
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(path_or_metadata):
    """Build the model's tokenizer from a GGUF file or from its metadata dict.

    Args:
      path_or_metadata: a .gguf path, or the metadata dict returned by ``read_gguf``
        or ``read_gguf_metadata`` (saves re-reading a large file).
    Returns:
      tokenizers.Tokenizer; its post-processor prepends BOS iff the file's
      ``tokenizer.ggml.add_bos_token`` is true.
    Raises:
      ModelFileError: the vocabulary is missing, inconsistent or of an unsupported kind.
    """
    tk = _import_tokenizers()
    meta = path_or_metadata
    if not isinstance(meta, dict):
        from minipatch.io.gguf import read_gguf_metadata
        meta = read_gguf_metadata(path_or_metadata)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError("GGUF metadata holds no list of strings tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", np.full(len(tokens), _NORMAL))
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) != len(tokens):
        raise ModelFileError("tokenizer.ggml.token_type is not one integer per token")
    types = types.tolist()
    for key in ("bos_token_id", "unknown_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise ModelFileError(f"tokenizer.ggml.{key} = {i!r} is outside the vocabulary")
    kind = meta.get("tokenizer.ggml.model")
    if not isinstance(kind, str) or kind not in ("llama", "gpt2"):
        raise ModelFileError(f"GGUF tokenizer model {kind!r} is not supported (llama, gpt2)")
    try:
        tok = _build_spm(tk, meta, tokens, types) if kind == "llama" else _build_byte_bpe(tk, meta, tokens)
        # Control tokens are special; user-defined pieces are matched whole, on the raw text.
        tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL and t])
        tok.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t])
        bos = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            tok.post_processor = tk.processors.TemplateProcessing(
                single=[tokens[bos], "$A"], pair=[tokens[bos], "$A", "$B"],
                special_tokens=[(tokens[bos], bos)])
    except ModelFileError:
        raise
    except Exception as e:  # tokenizers rejects an inconsistent vocabulary, merges or BOS
        raise ModelFileError(f"cannot build the {kind} tokenizer: {e}") from e
    return tok


def encode(tok, text: str, add_bos: bool = True) -> np.ndarray:
    """Token ids of ``text``: [T] int64, BOS first if ``add_bos`` and the model uses one.

    Args:
      tok: a tokenizer from ``tokenizer_from_gguf``.
      text: the text, no chat template applied.
      add_bos: apply the post-processor (BOS for Gemma; SmolLM2's GGUF asks for none).
    """
    return np.asarray(tok.encode(text, add_special_tokens=add_bos).ids, dtype=np.int64)


def decode(tok, ids) -> str:
    """Text of token ids (special tokens such as BOS/EOS dropped)."""
    return tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)
