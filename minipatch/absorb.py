"""The multi-layer algorithm (MATH.md M7) and greedy generation with absorbed context.

M7: run the model with context once, keeping every layer's input X_l^C. For each layer,
(1) take the with-context block values at the kept positions, (2) run the attention
sublayer alone on X_l^C[K] at the kept positions (attention sees only kept tokens),
(3) build the layer patch by the block's theorem (M6 for Gemma, M8 in general). By
induction the patched model without context has stream X_l^C[K] at every layer, so its
logits at kept positions equal the with-context logits. Cost: one with-context forward
(without the head) plus one attention pass over the kept positions per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device, to_numpy
from .blocks import attn_sublayer, layer_patch
from .controllability import take_rows
from .errors import NotControllableError
from .patches import Patches
from .validate import check_tokens, split_context


@dataclass(frozen=True)
class AbsorbResult:
    """What :func:`absorb` returns.

    Attributes:
      patches: :class:`~minipatch.patches.Patches`, one layer patch per layer.
      kept: int64 [T_K] the kept positions, in order.
      context: int64 [T_C] the absorbed positions.
      methods: per-layer construction actually used (e.g. 'm6a', 'm2', 'moe-one').
    """

    patches: Patches
    kept: np.ndarray
    context: np.ndarray
    methods: tuple


def absorb(model, tokens, context, method="auto", window_by="position"):
    """Absorb the tokens at ``context`` positions into token-dependent weight patches (M7).

    Then ``model.forward(tokens[res.kept], positions=res.kept, patches=res.patches)``
    equals ``model.forward(tokens)[res.kept]``.

    Args:
      model: a :class:`~minipatch.model.Model`.
      tokens: int [T].
      context: positions to remove (any subset, not only a prefix; at least one token kept).
      method: the outer witness: 'auto', or 'm6a' / 'm6b' / 'm6c' for post-norm blocks,
        'm2' / 'bias' for linear outers, 'one' / 'all' for MoE.
      window_by: sliding-window convention, as in :meth:`Model.run`.
    Raises:
      NotControllableError: naming the layer, the kept token's position and the quantity.
    """
    tok = check_tokens(tokens, model.cfg.vocab_size)
    ctx, kept = split_context(context, tok.size)
    xp = model.xp
    dev = device(model.params["embed.weight"])
    trace = {}
    model.run(tok, trace=trace, head=False, window_by=window_by)
    K = xp.asarray(kept, device=dev)
    index = xp.arange(kept.size, device=dev) if window_by == "index" else None
    layers, methods = [], []
    for l in range(model.cfg.n_layers):
        name, patch, _ = _layer_step(model, l, trace["layers"][l], kept, K, index, method)
        layers.append(patch)
        methods.append(name)
    return AbsorbResult(Patches(tuple(layers), kept, tuple(methods)), kept, ctx, tuple(methods))


def _layer_step(model, l, full, kept, K, index, method):
    """M7 steps (1)-(3) for layer ``l``: with-context values at the kept rows ``K`` of the
    block trace ``full``, the attention sublayer on them alone, the layer patch.

    Returns (construction name, layer patch, with-context trace at the kept rows). A missing
    witness is re-raised naming layer ``l`` and the kept token's original position.
    """
    lp = model.params["layers"][l]
    tr_ctx = {k: take_rows(full[k], K) for k in ("x", "a", "z", "h")}
    tr = {}
    attn_sublayer(model.spec, lp, tr_ctx["x"], model.cfg, l, K, trace=tr, index=index)
    try:
        name, patch = layer_patch(model.spec, lp, model.cfg, tr, tr_ctx, method)
    except NotControllableError as e:
        pos = int(kept[e.position]) if e.position is not None else None
        raise NotControllableError(e.quantity, e.value, layer=l, position=pos, hint=e.hint) from e
    return name, patch, tr_ctx


def patched_forward(model, tokens, res, **kw):
    """The patched model without context: logits [T_K, V] at the kept positions."""
    tok = check_tokens(tokens, model.cfg.vocab_size)
    return model.forward(tok[res.kept], positions=res.kept, patches=res.patches, **kw)


def greedy(model, tokens, n_new, context=None, method="auto", callback=None, window_by="position",
           patch_fn=None):
    """Greedy decoding, with context (``context=None``) or with it absorbed into patches.

    With ``context`` the patches are recomputed at every new token (M7) and the patched
    model runs on the kept tokens only. ``context`` is a fixed list of positions, or
    ``'all_but_last'``: every earlier token is context and the model sees only the current
    token at its absolute position (the experiment of Goldwaser et al. 2025, section 4).

    ``patch_fn`` (optional) maps each step's :class:`~minipatch.patches.Patches` to the ones
    actually applied, e.g. rounded to bfloat16 (``minipatch.experiment.round_patches``).

    Returns:
      (new token ids int64 [n_new], last-position logits of every step as numpy [n_new, V]).
    """
    seq = list(check_tokens(tokens, model.cfg.vocab_size))
    out, rows = [], []
    for step in range(n_new):
        if context is None:
            hidden = model.run(seq, head=False, window_by=window_by)
        else:
            T = len(seq)
            ctx = np.arange(T - 1) if isinstance(context, str) and context == "all_but_last" else context
            res = absorb(model, seq, ctx, method=method, window_by=window_by)
            patches = res.patches if patch_fn is None else patch_fn(res.patches)
            kept = np.asarray(seq)[res.kept]
            hidden = model.run(kept, positions=res.kept, patches=patches, head=False, window_by=window_by)
        logits = model.logits(hidden[-1:, ...])[0, ...]      # only the last row of the head
        row = to_numpy(logits)
        nxt = int(np.argmax(row))
        rows.append(np.asarray(row))
        out.append(nxt)
        seq.append(nxt)
        if callback is not None:
            callback(step, nxt)
    return np.asarray(out, dtype=np.int64), np.stack(rows)


@dataclass(frozen=True)
class BlockCheck:
    """One block's theorem, numerically: outputs at the kept tokens (numpy-free, backend arrays).

    Attributes:
      with_context: block(x)[kept], the block run on every position.
      patched: the patched block on x[kept] alone.
      unpatched: the block on x[kept] alone without patches (the negative control).
      patch: the layer patch; method: the construction used.
    """

    with_context: object
    patched: object
    unpatched: object
    patch: dict
    method: str


def check_block(model, layer, x, context, method="auto", window_by="position"):
    """The block theorem for layer ``layer`` on a residual stream ``x`` [T, D] (M6 / M8).

    Runs the block with context on all T positions, builds the layer patch from the kept
    positions, and runs the patched and unpatched block on the kept positions alone.
    """
    from .blocks import block_forward

    xp = model.xp
    T = x.shape[0]
    ctx, kept = split_context(context, T)
    dev = device(x)
    pos, K = xp.arange(T, device=dev), xp.asarray(kept, device=dev)
    idx_full = pos if window_by == "index" else None
    idx_kept = xp.arange(kept.size, device=dev) if window_by == "index" else None
    lp, cfg, spec = model.params["layers"][layer], model.cfg, model.spec
    full = {}
    out = block_forward(spec, lp, x, cfg, layer, pos, trace=full, index=idx_full)
    name, patch, tr_ctx = _layer_step(model, layer, full, kept, K, idx_kept, method)
    xk = tr_ctx["x"]
    patched = block_forward(spec, lp, xk, cfg, layer, K, patch=patch, index=idx_kept)
    unpatched = block_forward(spec, lp, xk, cfg, layer, K, index=idx_kept)
    return BlockCheck(take_rows(out, K), patched, unpatched, patch, name)
