"""The multi-layer algorithm (MATH.md M7), streamed with KV caches, and greedy generation.

M7: run the model with context once, keeping every layer's with-context values X_l^C.
Then layer by layer, at the kept tokens:

  (1) run the attention sublayer without context on the stream the patched model has
      there (``order='closed'``, the default) or on X_l^C[K] itself (``order='open'``);
  (2) build the layer patch by the block's theorem (M6 for Gemma, M8 in general) against
      the with-context targets;
  (3) closed loop only: run the patched MLP, and carry its output to the next layer.

In exact arithmetic both orders give the same patches: by induction the patched model's
stream is X_l^C[K] at every layer. In floating point the patched stream drifts from
X_l^C[K] by rounding; the closed loop builds each layer's delta on the drifted stream, so
it also cancels the drift of the layers before (MATH.md M7, "order of construction").
Cost: one with-context forward plus one patched pass over the kept tokens.

Streaming (:func:`absorb_prefill`, :func:`absorb_step`): for a growing sequence whose new
tokens are kept, each new token costs one cached with-context step and one closed-loop
patched step; the patches of earlier kept tokens never change (causality).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device, to_numpy
from .blocks import attention_values, layer_patch, mlp_values
from .controllability import check_method, take_rows
from .errors import InputError, NotControllableError
from .finite import check_patch_finite, quiet
from .model import Cache, fingerprint
from .patches import Patches, concat_patches
from .validate import check_choice, check_count, check_tokens, split_context

ORDERS = ("closed", "open")
VALUES = ("x", "a", "z", "h", "out")     # the with-context values a layer patch reads


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

    @property
    def layers(self):     # so that forward(patches=result) works like forward(patches=result.patches)
        return self.patches.layers


def _origin(model, window_by, order):
    return {**fingerprint(model), "window_by": window_by, "order": order}


def _check_args(model, method, window_by, order):
    check_method(model.spec.outer, model.cfg, method)
    check_choice(window_by, ("position", "index"), "window_by")
    check_choice(order, ORDERS, "order")


def absorb(model, tokens, context, method="auto", window_by="position", order="closed", patch_fn=None):
    """Absorb the tokens at ``context`` positions into token-dependent weight patches (M7).

    Then ``model.forward(tokens[res.kept], positions=res.kept, patches=res.patches)``
    equals ``model.forward(tokens)[res.kept]``.

    Args:
      model: a :class:`~minipatch.model.Model`.
      tokens: int [T].
      context: positions to remove (any subset, not only a prefix; at least one token kept).
      method: the outer witness, one of ``model.spec.outer.methods(model.cfg)``: 'auto', or
        'm6a' / 'm6b' / 'm6c' / 'm6d' for post-norm blocks, 'm2' / 'bias' for linear
        outers, 'one' / 'all' for MoE.
      window_by: sliding-window convention, as in :meth:`Model.run`.
      order: 'closed' (each layer's patch built on the patched stream) or 'open' (on the
        with-context stream X_l^C, the textbook order); MATH.md M7.
      patch_fn: optional map of each layer patch dict to the one actually applied (e.g.
        rounded to bfloat16); in the closed loop the next layer is built after it.
    Raises:
      NotControllableError: naming the layer, the kept token's position and the quantity.
      MethodError: ``method`` is not one of the family's constructions.
    """
    _check_args(model, method, window_by, order)
    tok = check_tokens(tokens, model.cfg.vocab_size)
    ctx, kept = split_context(context, tok.size)
    trace = {}
    model.run(tok, trace=trace, head=False, window_by=window_by)
    K = model.xp.asarray(kept, device=device(model.params["embed.weight"]))
    rows = [{k: take_rows(tr[k], K) for k in VALUES} for tr in trace["layers"]]
    index = model._index(window_by, 0, kept.size)
    methods, layers, _, _ = patch_layers(model, take_rows(trace["embed"], K), K, kept, rows, index,
                                         None, method, order, patch_fn)
    patches = Patches(tuple(layers), kept, tuple(methods), _origin(model, window_by, order))
    return AbsorbResult(patches, kept, ctx, tuple(methods))


def patch_layers(model, x, pos, pos_host, ctx_rows, index, cache, method, order, patch_fn=None):
    """M7 steps (1)-(3) for every layer at T kept tokens.

    Args:
      x: [T, D] the patched model's input stream at these tokens (the embedding).
      pos, pos_host: their positions (backend and numpy). index: sequence indices or None.
      ctx_rows: per layer, the with-context values (x, a, z, h, out) at these tokens.
      cache: :class:`~minipatch.model.Cache` of earlier kept tokens in the construction's
        stream (None: these tokens attend among themselves).
    Returns:
      (construction names, layer patches, per-layer (k, v) of these tokens, final stream
      [T, D]: the patched model's own output in the closed loop).
    """
    with quiet():
        return _patch_layers(model, x, pos, pos_host, ctx_rows, index, cache, method, order, patch_fn)


def _patch_layers(model, x, pos, pos_host, ctx_rows, index, cache, method, order, patch_fn):
    spec, cfg = model.spec, model.cfg
    names, layers, kvs = [], [], []
    for l, lp in enumerate(model.params["layers"]):
        inp = x if order == "closed" else ctx_rows[l]["x"]
        at = attention_values(spec, lp, inp, cfg, l, pos, None, index, cache.past(l) if cache else None)
        try:
            name, patch = layer_patch(spec, lp, cfg, {"x": inp, "a": at.a, "z": at.z}, ctx_rows[l], method)
        except NotControllableError as e:
            where = int(pos_host[e.position]) if e.position is not None else None
            raise NotControllableError(e.quantity, e.value, layer=l, position=where, hint=e.hint) from e
        if patch_fn is not None:
            patch = patch_fn(patch)
        check_patch_finite(patch, l, pos_host)
        if order == "closed":
            x = mlp_values(spec, lp, inp, at.z, at.a, cfg, patch).out
        names.append(name)
        layers.append(patch)
        kvs.append((at.k, at.v))
    return names, layers, kvs, x


def patched_forward(model, tokens, res, **kw):
    """The patched model without context: logits [T_K, V] at the kept positions (under the
    window convention the patches were made with, unless ``window_by`` is given)."""
    tok = check_tokens(tokens, model.cfg.vocab_size)
    kw.setdefault("window_by", (res.patches.origin or {}).get("window_by", "position"))
    return model.forward(tok[res.kept], positions=res.kept, patches=res.patches, **kw)


# ---- streaming ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    """State of a streamed absorption (:func:`absorb_prefill`, :func:`absorb_step`).

    Attributes:
      ctx: the with-context model's :class:`~minipatch.model.Cache` over every token.
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

    check_method(model.spec.outer, model.cfg, method)
    xp = model.xp
    T = x.shape[0]
    ctx, kept = split_context(context, T)
    dev = device(x)
    pos, K = xp.arange(T, device=dev), xp.asarray(kept, device=dev)
    idx_full = model._index(window_by, 0, T)
    idx_kept = model._index(window_by, 0, kept.size)
    lp, cfg, spec = model.params["layers"][layer], model.cfg, model.spec
    full = {}
    block_forward(spec, lp, x, cfg, layer, pos, trace=full, index=idx_full)      # fills `full`
    rows = {k: take_rows(full[k], K) for k in VALUES}
    at = attention_values(spec, lp, rows["x"], cfg, layer, K, None, idx_kept)
    try:
        name, patch = layer_patch(spec, lp, cfg, {"x": rows["x"], "a": at.a, "z": at.z}, rows, method)
    except NotControllableError as e:
        where = int(kept[e.position]) if e.position is not None else None
        raise NotControllableError(e.quantity, e.value, layer=layer, position=where, hint=e.hint) from e
    patched = block_forward(spec, lp, rows["x"], cfg, layer, K, patch=patch, index=idx_kept)
    unpatched = block_forward(spec, lp, rows["x"], cfg, layer, K, index=idx_kept)
    return BlockCheck(rows["out"], patched, unpatched, patch, name)
