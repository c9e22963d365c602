"""The multi-layer algorithm (MATH.md M7), and the block theorem checked on one layer.

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

Streaming the same algorithm with KV caches, and greedy generation, are in
:mod:`minipatch.decode`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device
from .blocks import attention_values, layer_patch, mlp_values
from .controllability import check_method, take_rows
from .errors import NotControllableError
from .finite import check_patch_finite, quiet
from .binding import fingerprint
from .patches import Patches
from .validate import check_choice, check_tokens, split_context

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
      cache: :class:`~minipatch.cache.Cache` of earlier kept tokens in the construction's
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
