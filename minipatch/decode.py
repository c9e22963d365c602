"""M7 streamed with KV caches, and greedy generation (MATH.md M7).

Streaming (:func:`absorb_prefill`, :func:`absorb_step`): for a growing sequence whose new
tokens are kept, each new token costs one cached with-context step and one closed-loop
patched step (:func:`~minipatch.absorb.patch_layers` for that token alone); the patches of
earlier kept tokens never change (causality). With ``context='all_but_last'`` every earlier
token is context and the patched model sees only the newest token.

:func:`greedy` decodes with the context in the prompt or absorbed, every path KV-cached;
:func:`step_many` steps several sequences, one token each, in one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .absorb import VALUES, _check_args, _origin, patch_layers
from .backend import device, to_numpy
from .blocks import attention_values_many, mlp_values
from .controllability import take_rows
from .errors import InputError, NonFiniteError
from .finite import all_finite, check_values, first_row
from .cache import Cache
from .patches import Patches, concat_patches, norm
from .validate import check_count, check_tokens, split_context


# ---- streaming ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    """State of a streamed absorption (:func:`absorb_prefill`, :func:`absorb_step`).

    Attributes:
      ctx: the with-context model's :class:`~minipatch.cache.Cache` over every token.
      build: cache of the kept tokens in the construction's stream (None in 'last' mode,
        where the patched model sees only the newest token).
      evaluate: cache of the patched model itself (the same object as ``build`` in the
        closed loop; open loop: the patched model's own, drifted, stream).
      steps: one :class:`~minipatch.patches.Patches` per absorbed batch of kept tokens.
      mode: 'fixed' (a fixed context set; new tokens are kept) or 'last' (every earlier
        token is context, ``context='all_but_last'``).
      tokens: every token so far. patch_fn: as in :func:`absorb`.
    """

    ctx: Cache
    build: object
    evaluate: object
    steps: tuple
    method: str
    order: str
    window_by: str
    mode: str
    tokens: tuple
    patch_fn: object = None

    @property
    def patches(self):
        """Every kept token's patches so far, as one :class:`Patches` ('fixed' mode)."""
        return concat_patches(self.steps)

    @property
    def kept(self):
        return np.concatenate([np.asarray(s.positions) for s in self.steps])


def _ctx_rows(trace, rows=None):
    out = []
    for tr in trace["layers"]:
        out.append({k: (tr[k] if rows is None else take_rows(tr[k], rows)) for k in VALUES})
    return out


def absorb_prefill(model, tokens, context, method="auto", window_by="position", order="closed",
                   patch_fn=None):
    """Start a streamed absorption: :func:`absorb` on ``tokens`` that also keeps caches.

    ``context`` is a set of positions (the new tokens of :func:`absorb_step` are kept) or
    ``'all_but_last'`` (every token but the newest is context at every step).

    Returns:
      (logits [V] of the patched model at the last kept token, :class:`Stream`).
    """
    _check_args(model, method, window_by, order)
    tok = check_tokens(tokens, model.cfg.vocab_size)
    mode = "last" if isinstance(context, str) and context == "all_but_last" else "fixed"
    if mode == "last":
        ctx, kept = split_context(np.arange(tok.size - 1), tok.size) if tok.size > 1 else (None, np.zeros(1, np.int64))
    else:
        ctx, kept = split_context(context, tok.size)
    trace = {}
    _, ctx_cache = model.prefill(tok, window_by=window_by, trace=trace, head=False)
    dev = device(model.params["embed.weight"])
    K = model.xp.asarray(kept, device=dev)
    rows = _ctx_rows(trace, K)
    index = model._index(window_by, 0, kept.size)
    methods, layers, kvs, x = patch_layers(model, take_rows(trace["embed"], K), K, kept, rows, index,
                                           None, method, order, patch_fn)
    patches = Patches(tuple(layers), kept, tuple(methods), _origin(model, window_by, order))
    build = Cache.empty(model, window_by).extend(kvs, K, kept) if mode == "fixed" else None
    logits, evaluate = _evaluate(model, tok[kept], kept, patches, x, build, None, order, window_by, mode)
    st = Stream(ctx_cache, build, evaluate, (patches,), method, order, window_by, mode,
                tuple(int(t) for t in tok), patch_fn)
    return logits, st


def _evaluate(model, tok, kept, patches, x, build, evaluate, order, window_by, mode):
    """The patched model's logits at the newest kept token and its cache."""
    if order == "closed":            # the construction ran the patched model itself
        from .patches import norm

        xf = norm(model.params, "final_norm", x[-1:, ...], model.cfg)
        return model.logits(xf)[0, ...], build
    if mode == "last" or evaluate is None:
        logits, cache = model.prefill(tok, positions=kept, patches=patches, window_by=window_by)
        return logits, (cache if mode == "fixed" else None)
    return model.step(evaluate, tok, position=kept, patches=patches)


def absorb_step(model, stream, token):
    """One more token, kept: its patches from one cached with-context step and one patched
    step (closed loop) over the earlier kept tokens' cache.

    Returns:
      (logits [V] of the patched model at the new token, its :class:`Patches`, new :class:`Stream`).
    """
    t = check_tokens([token], model.cfg.vocab_size)
    trace = {}
    _, ctx_cache = model.step(stream.ctx, t, trace=trace, head=False)
    position = np.asarray([ctx_cache.last], dtype=np.int64)
    dev = device(model.params["embed.weight"])
    P = model.xp.asarray(position, device=dev)
    rows = _ctx_rows(trace)
    build = stream.build
    start = 0 if stream.mode == "last" else build.n
    index = model._index(stream.window_by, start, 1)
    methods, layers, kvs, x = patch_layers(model, trace["embed"], P, position, rows, index, build,
                                           stream.method, stream.order, stream.patch_fn)
    patches = Patches(tuple(layers), position, tuple(methods), stream.steps[0].origin)
    if stream.mode == "fixed":
        build = build.extend(kvs, P, position)
    logits, evaluate = _evaluate(model, t, position, patches, x, build, stream.evaluate,
                                 stream.order, stream.window_by, stream.mode)
    steps = (patches,) if stream.mode == "last" else stream.steps + (patches,)
    new = Stream(ctx_cache, build, evaluate, steps, stream.method, stream.order, stream.window_by,
                 stream.mode, stream.tokens + (int(t[0]),), stream.patch_fn)
    return logits, patches, new


# ---- greedy decoding ------------------------------------------------------------------------

def greedy(model, tokens, n_new, context=None, method="auto", callback=None, window_by="position",
           patch_fn=None, order="closed"):
    """Greedy decoding, with context (``context=None``) or with it absorbed into patches.

    Every path is KV-cached: ``context=None`` prefills once and then steps; with a fixed
    list of ``context`` positions the patched model runs on the kept tokens only and each
    new token is absorbed by :func:`absorb_step`; ``'all_but_last'`` makes every earlier
    token context, so the patched model sees only the current token at its absolute
    position (the experiment of Goldwaser et al. 2025, section 4). Each new token costs
    one cached step (two with context absorbed).

    ``patch_fn`` (optional) maps each layer patch dict to the one actually applied, e.g.
    rounded to bfloat16 (``minipatch.experiment.round_layer``); in the closed loop the
    next layer's patch is built on the stream the rounded patch gives.

    Returns:
      (new token ids int64 [n_new], last-position logits of every step as numpy [n_new, V]).
    """
    n_new = check_count(n_new, "n_new")
    tok = check_tokens(tokens, model.cfg.vocab_size)
    if context is not None:
        _check_args(model, method, window_by, order)
    if n_new == 0:
        return np.zeros(0, np.int64), np.zeros((0, model.cfg.vocab_size), dtype=np.dtype(str(model.dtype)))
    if context is None:
        logits, state = model.prefill(tok, window_by=window_by)
        advance = (lambda s, t: model.step(s, t))
    else:
        if isinstance(context, str) and context != "all_but_last":
            raise InputError(f"context must be positions or 'all_but_last', got {context!r}")
        logits, state = absorb_prefill(model, tok, context, method, window_by, order, patch_fn)
        advance = (lambda s, t: absorb_step(model, s, t)[::2])
    out, rows = [], []
    for step in range(n_new):
        row = to_numpy(logits)
        nxt = int(np.argmax(row))
        rows.append(np.asarray(row))
        out.append(nxt)
        if callback is not None:
            callback(step, nxt)
        if step + 1 < n_new:
            logits, state = advance(state, nxt)
    return np.asarray(out, dtype=np.int64), np.stack(rows)


def step_many(model, caches, tokens):
    """:meth:`~minipatch.model.Model.step` (unpatched, ``head=False``) for S sequences at once,
    one new token each: the same values, with every weight read once for all S rows.

    Returns:
      (final normed hidden [S, D], the S extended caches, embeddings [S, D], per layer the
      values x, a, z, h, out [S, ...]).
    """
    xp, spec, cfg = model.xp, model.spec, model.cfg
    pos_host = np.asarray([c.last + 1 for c in caches], np.int64)
    for i, c in enumerate(caches):        # each row is checked as Model.step checks it
        model._inputs(tokens[i:i + 1], pos_host[i:i + 1])
    dev = device(model.params["embed.weight"])
    tok, pos = xp.asarray(np.asarray(tokens, np.int64), device=dev), xp.asarray(pos_host, device=dev)
    by_index = caches[0].window_by == "index"
    index = xp.asarray([c.n for c in caches], device=device(pos)) if by_index else None
    x = embed = model.embed(tok, pos)
    layers, kvs = [], []
    for l, lp in enumerate(model.params["layers"]):
        at = attention_values_many(spec, lp, x, cfg, l, pos, [c.past(l) for c in caches], index)
        ml = mlp_values(spec, lp, x, at.z, at.a, cfg)
        vals = dict(x=x, a=at.a, z=at.z, h=ml.h, d=ml.d, m=ml.m, out=ml.out)
        if not all_finite(ml.out):
            check_values(vals, l, pos_host)
        layers.append({k: vals[k] for k in VALUES})
        kvs.append((at.k, at.v))
        x = ml.out
    xf = norm(model.params, "final_norm", x, cfg)
    if not all_finite(xf):
        raise NonFiniteError("final norm output", position=int(pos_host[first_row(xf)]),
                             hint="check final_norm.weight")
    new = []
    for i, c in enumerate(caches):
        one = xp.asarray([i], device=device(x))
        new.append(c.extend([(take_rows(k, one), take_rows(v, one)) for k, v in kvs], pos[i:i + 1],
                            pos_host[i:i + 1]))
    return xf, new, embed, layers
