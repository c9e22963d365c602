"""Many short prompts in one pass: a shared prefix and B suffixes packed into the rows of one run.

Every suffix attends to the shared prefix and, causally, to itself; never to another suffix.
The rows are ``prefix ++ suffix_0 ++ ... ++ suffix_{B-1}``; suffix b's tokens sit at the
positions that follow the prefix (``P, P + 1, ...``), exactly where they would sit after the
prefix in a run of ``prefix ++ suffix_b`` alone. So row r of a packed run equals, to
rounding, the same token's row of that single run (tested against :meth:`Model.forward`).

Why: a forward of a few tokens reads every weight once (Gemma 3 270M: ~400 MB in float32),
so 64 short queries cost 64 weight reads one by one and one packed. The in-context prompts of
a task share their demonstrations (the prefix), which are then run once.

The attention mask of the packed rows (``visible``): key s is visible to query r iff
``pos_s <= pos_r``, s is in the prefix or in r's own suffix, and (sliding windows)
``pos_r - pos_s < W``: the ``window_by="position"`` convention of :meth:`Model.run`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device
from .blocks.base import AttnValues, attention_output, mlp_input, mlp_values, project_qkv
from .errors import InputError
from .ops import attention
from .patches import norm
from .validate import check_tokens


@dataclass(frozen=True)
class Pack:
    """The rows of a packed run (numpy, host).

    Attributes:
      tokens: int64 [R]. positions: int64 [R]. seq: int64 [R], -1 for prefix rows, b for
        rows of suffix b. starts: int64 [B + 1], row where suffix b starts (starts[B] = R).
    """

    tokens: np.ndarray
    positions: np.ndarray
    seq: np.ndarray
    starts: np.ndarray

    @property
    def n_prefix(self):
        return int(self.starts[0])

    @property
    def n_suffixes(self):
        return int(self.starts.size - 1)

    def rows(self, b):
        """Row indices [T_b] of suffix b."""
        return np.arange(self.starts[b], self.starts[b + 1])

    def last_rows(self):
        """Row index of every suffix's last token [B]."""
        return self.starts[1:] - 1


def pack(prefix, suffixes, vocab_size):
    """Pack ``prefix`` (int [P], P >= 1) and ``suffixes`` (list of int [T_b], T_b >= 1)."""
    pre = check_tokens(prefix, vocab_size)
    sufs = [check_tokens(s, vocab_size) for s in suffixes]
    lengths = np.array([s.size for s in sufs], dtype=np.int64)
    P = pre.size
    tokens = np.concatenate([pre] + sufs)
    positions = np.concatenate([np.arange(P)] + [P + np.arange(n) for n in lengths]).astype(np.int64)
    seq = np.concatenate([np.full(P, -1)] + [np.full(n, b) for b, n in enumerate(lengths)]).astype(np.int64)
    starts = P + np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Pack(tokens, positions, seq, starts)


def visible(pk, window=None):
    """Boolean [R, R]: key s visible to query r (module docstring)."""
    same = (pk.seq[None, :] == -1) | (pk.seq[None, :] == pk.seq[:, None])
    vis = same & (pk.positions[None, :] <= pk.positions[:, None])
    if window:
        vis &= (pk.positions[:, None] - pk.positions[None, :]) < window
    return vis


class Masks:
    """The packed mask per sliding window (one for full layers, one per window), on the model's device."""

    def __init__(self, model, pk):
        self.model, self.pk, self.cache = model, pk, {}

    def __call__(self, window):
        if window not in self.cache:
            xp = self.model.xp
            self.cache[window] = xp.asarray(visible(self.pk, window), device=device(self.model.params["embed.weight"]))
        return self.cache[window]


def attention_rows(model, layer, x, pos, mask, patch=None):
    """The attention sublayer of ``layer`` on packed rows x [R, D] (:class:`AttnValues`)."""
    spec, cfg, p = model.spec, model.cfg, model.params["layers"][layer]
    q, k, v = project_qkv(p, norm(p, "attn_norm", x, cfg) if spec.attn_pre_norm else x, cfg, layer, pos, patch)
    o = attention(q, k, v, mask, cfg.score_scale, cfg.attn_softcap)
    a = attention_output(spec, p, o, cfg, patch)
    return AttnValues(mlp_input(spec, p, x, a, cfg, patch), a, k, v)


def run(model, pk, *, start=0, x=None, steer=None, patches=None, trace=None):
    """The stack on packed rows; returns the last layer's output stream [R, D] (before the final norm).

    Args:
      model: a :class:`~minipatch.model.Model`.
      pk: :class:`Pack`.
      start: first layer to run; ``x`` [R, D] is then that layer's input (default: the embedding,
        with start 0).
      steer: optional per-layer list of [D] vectors (or None) added to each layer's output
        (a constant residual shift, e.g. a thought vector).
      patches: optional per-layer list of layer patch dicts with one row per packed row.
      trace: optional dict, filled with ``layers``: per layer dict x, a, z, h, m, out.
    """
    L = model.cfg.n_layers
    if not 0 <= start <= L:
        raise InputError(f"start layer {start} outside 0..{L}")
    xp, dev = model.xp, device(model.params["embed.weight"])
    pos = xp.asarray(pk.positions, device=dev)
    if x is None:
        if start:
            raise InputError("a run that starts after layer 0 needs its input stream x")
        x = model.embed(xp.asarray(pk.tokens, device=dev), pos)
    masks, rows = Masks(model, pk), []
    for l in range(start, L):
        patch = patches[l] if patches is not None else None
        at = attention_rows(model, l, x, pos, masks(model.cfg.window(l)), patch)
        ml = mlp_values(model.spec, model.params["layers"][l], x, at.z, at.a, model.cfg, patch)
        if trace is not None:
            rows.append(dict(x=x, a=at.a, z=at.z, h=ml.h, m=ml.m, out=ml.out))
        x = ml.out
        if steer is not None and steer[l] is not None:
            x = x + steer[l]
    if trace is not None:
        trace["layers"] = rows
    return x


def logits(model, x, rows):
    """Logits [len(rows), V] at the packed ``rows`` of a final stream x [R, D] (final norm, head)."""
    xp = model.xp
    idx = xp.asarray(np.asarray(rows, dtype=np.int64), device=device(x))
    return model.logits(norm(model.params, "final_norm", xp.take(x, idx, axis=0), model.cfg))


__all__ = ["Pack", "pack", "visible", "Masks", "attention_rows", "run", "logits"]
