"""The in-context task protocol: word-level tasks, a fixed prompt format, seeded splits, scoring.

Data: nine tasks of Todd et al. (ICLR 2024, function vectors; MIT License), shipped as package
data in ``minipatch/data/function_vectors/`` (README and LICENSE there). A prompt is

    <bos> Q: x_1\\nA: y_1\\n\\n ... Q: x_k\\nA: y_k\\n\\n Q: x\\nA:      -> answer " y"

built from token pieces (``HEAD`` "Q:", the query " x\\nA:", the answer " y", ``SEP``), so the
query's tokens are the same with and without demonstrations. Zero-shot is the same prompt with
k = 0. Scoring reads the logits at the rows that predict the answer (teacher forcing): the first
answer token (``first``) and every answer token (``exact``: greedy decoding would produce the
whole answer).

Splits (:func:`split`): per seed, the examples are shuffled once; the first ``n_demos`` are the
demonstrations (k = 5 uses the first five), the next ``n_calib`` the calibration queries, the
next ``n_held`` the held-out queries. Held-out queries are never used to choose anything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .errors import InputError
from .packed import pack

TASKS = ("antonym", "capitalize", "country-capital", "english-french", "landmark-country", "person-sport",
         "present-past", "singular-plural", "synonym")
HEAD, QUERY, ANSWER, SEP = "Q:", " {x}\nA:", " {y}", "\n\n"
MAX_TASK_BYTES = 2_000_000


def load_task(name):
    """The (input, output) string pairs of task ``name`` (one of :data:`TASKS`), in file order."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; one of {TASKS}")
    raw = resources.files("minipatch").joinpath("data", "function_vectors", f"{name}.json").read_bytes()
    if len(raw) > MAX_TASK_BYTES:
        raise InputError(f"task file {name}.json is {len(raw)} bytes, over {MAX_TASK_BYTES}")
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, list) or not all(
            isinstance(d, dict) and isinstance(d.get("input"), str) and isinstance(d.get("output"), str)
            for d in data):
        raise InputError(f"task file {name}.json must be a list of {{'input': str, 'output': str}}")
    return [(d["input"], d["output"]) for d in data]


@dataclass(frozen=True)
class Example:
    """One task example: ``query`` tokens of " x\\nA:" and ``answer`` tokens of " y" (int64)."""

    x: str
    y: str
    query: np.ndarray
    answer: np.ndarray


def encode_examples(pairs, encode):
    """Tokenise pairs with ``encode`` (text -> int ids, no BOS); an input seen before is dropped
    (the data has a few inputs with two answers), as is an empty input or answer."""
    out, seen = [], set()
    for x, y in pairs:
        if x in seen or not x.strip() or not y.strip():
            continue
        seen.add(x)
        q = np.asarray(encode(QUERY.format(x=x)), dtype=np.int64)
        a = np.asarray(encode(ANSWER.format(y=y)), dtype=np.int64)
        out.append(Example(x, y, q, a))
    return out


@dataclass(frozen=True)
class Split:
    """Demonstrations, calibration queries and held-out queries of one seed."""

    demos: tuple
    calib: tuple
    held: tuple


def split(examples, seed, n_demos, n_calib, n_held):
    """The seeded split (module docstring); InputError if the task has too few examples."""
    need = n_demos + n_calib + n_held
    if len(examples) < need:
        raise InputError(f"the task has {len(examples)} usable examples, the split needs {need}")
    order = np.random.default_rng(seed).permutation(len(examples))
    pick = [examples[i] for i in order[:need]]
    return Split(tuple(pick[:n_demos]), tuple(pick[n_demos:n_demos + n_calib]), tuple(pick[n_demos + n_calib:]))


def demo_tokens(demos, encode):
    """Tokens of the demonstration block: HEAD, query, answer and SEP for each demonstration."""
    head, sep = np.asarray(encode(HEAD), np.int64), np.asarray(encode(SEP), np.int64)
    parts = [np.concatenate([head, d.query, d.answer, sep]) for d in demos]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Batch:
    """Queries packed behind one prefix (<bos>, demonstrations, HEAD), answers teacher-forced.

    Attributes:
      pack: the :class:`~minipatch.packed.Pack`; suffix b is query_b ++ answer_b[:-1].
      answer_rows: int64 [A] the rows that predict each answer token, query by query.
      owner: int64 [A] the query of each answer row. first_rows: int64 [B] the row that
        predicts each query's first answer token. targets: int64 [A] the answer tokens.
      n_head: tokens of HEAD (kept rows of the prefix besides <bos>).
    """

    pack: object
    answer_rows: np.ndarray
    owner: np.ndarray
    first_rows: np.ndarray
    targets: np.ndarray
    n_head: int

    def head(self, n):
        """The batch of the first ``n`` queries (its rows are the first rows of this one)."""
        pk = self.pack
        from .packed import Pack

        sub = Pack(pk.tokens[:pk.starts[n]], pk.positions[:pk.starts[n]], pk.seq[:pk.starts[n]], pk.starts[:n + 1])
        keep = self.owner < n
        return Batch(sub, self.answer_rows[keep], self.owner[keep], self.first_rows[:n], self.targets[keep],
                     self.n_head)


def batch(bos, context, examples, encode, vocab_size):
    """Pack ``examples`` behind ``[bos] + context + HEAD`` (context: demonstration tokens, or none)."""
    if not examples:
        raise InputError("a batch needs at least one query")
    head = np.asarray(encode(HEAD), np.int64)
    prefix = np.concatenate([[bos], np.asarray(context, np.int64), head]).astype(np.int64)
    suffixes = [np.concatenate([e.query, e.answer[:-1]]) for e in examples]
    pk = pack(prefix, suffixes, vocab_size)
    rows, owner, targets, first = [], [], [], []
    for b, e in enumerate(examples):
        r = pk.starts[b] + e.query.size - 1 + np.arange(e.answer.size)
        rows.append(r), owner.append(np.full(e.answer.size, b)), targets.append(e.answer), first.append(r[0])
    return Batch(pk, np.concatenate(rows), np.concatenate(owner), np.asarray(first, np.int64),
                 np.concatenate(targets), int(head.size))


def kept_rows(ctx, noctx):
    """Rows of the with-context batch ``ctx`` that correspond, one to one, to every row of the
    zero-shot batch ``noctx`` of the same queries: <bos>, HEAD, then the suffixes."""
    pc, pn = ctx.pack.n_prefix, noctx.pack.n_prefix
    if ctx.pack.tokens.size - pc != noctx.pack.tokens.size - pn or not np.array_equal(
            ctx.pack.tokens[pc:], noctx.pack.tokens[pn:]):
        raise InputError("the two batches do not hold the same queries")
    return np.concatenate([[0], np.arange(pc - noctx.n_head, pc), pc + np.arange(noctx.pack.tokens.size - pn)])


def score(logits, bt):
    """Per query: (first answer token right, every answer token right), from the logits [A, V]
    at ``bt.answer_rows``."""
    right = np.asarray(np.argmax(logits, axis=-1)) == bt.targets
    n = bt.first_rows.size
    first = right[np.searchsorted(bt.owner, np.arange(n))]
    exact = np.ones(n, bool)
    np.logical_and.at(exact, bt.owner, right)
    return first, exact


def byte_encoder(vocab_size):
    """A tokenizer for tiny random models: UTF-8 bytes modulo ``vocab_size`` (no BOS)."""
    return lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) % vocab_size


__all__ = ["TASKS", "HEAD", "QUERY", "ANSWER", "SEP", "load_task", "Example", "encode_examples", "Split", "split",
           "demo_tokens", "Batch", "batch", "kept_rows", "score", "byte_encoder"]


def real_model(dtype="float32"):
    """(Gemma 3 270M, its BOS id, encode: text -> ids without BOS)."""
    from . import load
    from .io.gguf import gemma3_270m_path, read_gguf_metadata
    from .io.tokenizer import encode, tokenizer_from_gguf

    path = gemma3_270m_path()
    meta = read_gguf_metadata(path)
    tok = tokenizer_from_gguf(meta)
    return load(path, dtype=dtype), int(meta["tokenizer.ggml.bos_token_id"]), \
        (lambda text: encode(tok, text, add_bos=False))
