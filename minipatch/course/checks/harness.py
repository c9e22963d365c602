"""The two theorem harnesses the unit checks share: one block, and a whole model (M7).

Both run the reference model (:mod:`minipatch.blocks`, :class:`~minipatch.model.Model`)
around whatever builds the patches, so only the graded function can be wrong:

- :func:`block_theorem`: layer ``layer`` run with context on a stream ``x``, and without
  context on the kept tokens with the patch ``block_patch(noctx, ctx_kept)`` returns.
- :func:`absorb_with`: the multi-layer algorithm ``m7`` (the student's or the reference's,
  :func:`minipatch.course.reference.m7`) with the block theorem ``block_patch(l, noctx,
  ctx_kept)``; the patched model then runs on the kept tokens alone.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...blocks import attention_values, block_forward, layer_patch, mlp_values
from ...errors import NotControllableError
from ...patches import Patches
from .base import rel_err

VALUES = ("x", "a", "z", "h", "out")


class Outcome(NamedTuple):
    """Outputs at the kept tokens: with context (the target), patched, unpatched; the patches;
    for a model, ``streams``: per layer, the patched stream's relative error against X_l^C."""

    target: object
    patched: object
    unpatched: object
    patches: object
    streams: tuple = ()

    @property
    def stream_err(self):
        """The worst layer: M7 holds at every layer, not only at the logits (the closed loop's
        last patch alone would already fix the logits)."""
        return max(self.streams, default=0.0)

    @property
    def err(self):
        return rel_err(self.patched, self.target)

    @property
    def control(self):
        return rel_err(self.unpatched, self.target)


def kept_of(T, context):
    return np.setdiff1d(np.arange(T), np.asarray(context, dtype=np.int64))


def rows_of(values, kept):
    return {k: values[k][kept] for k in VALUES}


def stream(model, tokens, layer):
    """The with-context residual stream entering ``layer``."""
    tr = {}
    model.run(tokens, trace=tr, head=False)
    return tr["layers"][layer]["x"]


def block_theorem(model, layer, x, context, block_patch):
    """One block's theorem on stream ``x`` [T, D] with ``block_patch(noctx, ctx_kept) -> patch``."""
    spec, cfg, lp = model.spec, model.cfg, model.params["layers"][layer]
    T = x.shape[0]
    kept = kept_of(T, context)
    full = {}
    block_forward(spec, lp, x, cfg, layer, np.arange(T), trace=full)
    rows = rows_of(full, kept)
    at = attention_values(spec, lp, rows["x"], cfg, layer, kept)
    patch = block_patch({"x": rows["x"], "a": at.a, "z": at.z}, rows)
    patched = block_forward(spec, lp, rows["x"], cfg, layer, kept, patch=patch)
    unpatched = block_forward(spec, lp, rows["x"], cfg, layer, kept)
    return Outcome(rows["out"], patched, unpatched, patch)


def reference_block_patch(model, method="auto"):
    """The spine's block theorem (M6 / M8) for :func:`absorb_with`, errors naming the layer."""
    def block_patch(l, noctx, rows):
        try:
            return layer_patch(model.spec, model.params["layers"][l], model.cfg, noctx, rows, method)[1]
        except NotControllableError as e:
            raise NotControllableError(e.quantity, e.value, layer=l, position=e.position, hint=e.hint) from e
    return block_patch


def absorb_with(model, tokens, context, m7, block_patch=None, method="auto"):
    """M7 by ``m7(ctx, kept, attention, block_patch, mlp)`` on the reference model.

    Returns:
      :class:`Outcome` on the logits at the kept tokens (patches: the list m7 returned).
    """
    tok = np.asarray(tokens)
    kept = kept_of(tok.size, context)
    spec, cfg, layers = model.spec, model.cfg, model.params["layers"]
    tr = {}
    model.run(tok, trace=tr, head=False)
    ctx = [{k: lt[k] for k in VALUES} for lt in tr["layers"]]

    def attention(l, x, positions):
        at = attention_values(spec, layers[l], x, cfg, l, np.asarray(positions))
        return at.a, at.z

    def mlp(l, x, a, z, patch):
        return mlp_values(spec, layers[l], x, z, a, cfg, patch).out

    bp = block_patch or reference_block_patch(model, method)
    patches = m7(ctx, kept, attention, bp, mlp)
    if not isinstance(patches, (list, tuple)) or len(patches) != cfg.n_layers:
        raise AssertionError(f"m7 must return a list of {cfg.n_layers} layer patches, got "
                             f"{type(patches).__name__} of length {len(patches) if hasattr(patches, '__len__') else '?'}")
    P = Patches(tuple(patches), kept)
    target = model.forward(tok)[kept]
    tp = {}
    patched = model.forward(tok[kept], positions=kept, patches=P, trace=tp)
    streams = tuple(rel_err(tp["layers"][l]["out"], lt["out"][kept]) for l, lt in enumerate(tr["layers"]))
    return Outcome(target, patched, model.forward(tok[kept], positions=kept), list(patches), streams)


__all__ = ["Outcome", "block_theorem", "absorb_with", "reference_block_patch", "stream", "kept_of", "rows_of"]
