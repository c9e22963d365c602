"""Many absorbed-context greedy runs advanced together: the generation experiment's engine
(MATH.md M7, ``context='all_but_last'``).

``lockstep_greedy`` gives, for every prompt and every (order, method), what
``greedy(model, prompt, n_new, context='all_but_last', method=method, order=order)`` gives,
together with the with-context greedy run it is compared with, at a fraction of the cost
(tested equal in float64 to rounding). Three facts make that possible:

- the patched model sees only the current token, which attends only to itself: its
  attention output is its value, projected (:func:`~minipatch.blocks.own_attention_values`),
  so no patched cache is needed and the runs' rows are independent;
- a one-token step costs nearly as much as a step of a few tokens (every weight is read
  either way), so the rows of every run go through each layer together: one matmul per
  weight instead of one per run, each row with its own token-dependent patch (a rank-1
  patch with R rows is R rank-1 patches; rows of different constructions are stacked by
  :func:`~minipatch.patches.stack_patches`). The theorem (M8) runs row-group-wise: the
  inner witness (M1), the same for every construction, once for all rows; the outer witness
  once per construction;
- runs whose tokens agree so far share the with-context step (a cached step of the
  sequence they share), and the reference run is that same step with the LM head.

A run whose construction fails (no witness, a non-finite value) stops with the error it
would raise alone; the others go on.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .absorb import ORDERS, VALUES
from .backend import device, namespace, to_numpy
from .blocks import mlp_values, own_attention_values, theorem_inputs
from .controllability import check_method, take_rows
from .decode import step_many
from .errors import InputError, MinipatchError, NonFiniteError, NotControllableError
from .finite import all_finite, check_patch_finite, check_values, first_row, quiet
from .patches import Scale, norm, stack_patches, take_layer_rows
from .validate import check_choice, check_count, check_tokens

@dataclass
class Run:
    """One absorbed greedy run: its prompt, construction and order, and what it produced.

    Attributes:
      ids: generated token ids. abs_err: per step, max |patched - with-context logits| (only
      meaningful while the two runs' tokens agree). largest: the largest |scale patch|
      (M6b's multiplicative one as |mul - 1|). error: ``'ClassName: message'`` if it stopped.
    """

    prompt: int
    method: str
    order: str
    seq: list = field(repr=False, default_factory=list)
    ids: list = field(default_factory=list)
    abs_err: list = field(default_factory=list)
    largest: float = 0.0
    error: str = None


class _RowFailed(Exception):
    def __init__(self, row, error):
        super().__init__(row)
        self.row, self.error = row, error


def lockstep_greedy(model, prompts, n_new, methods, orders=("closed",), patch_fn=None, callback=None):
    """With-context greedy and absorbed greedy (``'all_but_last'``) for every prompt, method
    and order, run together.

    Args:
      prompts: list of token id arrays. methods, orders: the constructions and M7 orders.
      patch_fn: maps a layer patch to the one applied (e.g. bf16 rounding); it must act row
        by row, as rounding does, since one patch holds the rows of several runs.
      callback: called with the step number after every step.
    Returns:
      (refs, runs): ``refs[k]`` = dict(ids [n_new] int64, scale [n_new] = max |logits|) of
      the with-context run of prompt k; ``runs``: list of :class:`Run`, prompt-major, then
      order, then method.
    """
    n_new = check_count(n_new, "n_new")
    for m in methods:
        check_method(model.spec.outer, model.cfg, m)
    for o in orders:
        check_choice(o, ORDERS, "order")
    toks = [check_tokens(t, model.cfg.vocab_size) for t in prompts]
    if not toks:
        raise InputError("lockstep_greedy needs at least one prompt")
    refs = [dict(seq=[int(t) for t in tk], ids=[], scale=[]) for tk in toks]
    runs = [Run(k, m, o, seq=list(refs[k]["seq"])) for k in range(len(toks)) for o in orders for m in methods]
    memo, xp = {}, model.xp
    for step in range(n_new):
        memo = _ctx_steps(model, [r["seq"] for r in refs] + [r.seq for r in runs if r.error is None], memo)
        alive = [r for r in runs if r.error is None]
        with quiet():
            rows, keep, largest = _patched_rows(model, alive, memo, patch_fn)
        alive = [alive[i] for i in keep]
        xf = [memo[tuple(r["seq"])]["final"] for r in refs]
        logits = to_numpy(model.logits(xp.concat(xf + ([rows] if alive else []), axis=0))).astype(np.float64)
        ref_rows = logits[:len(refs)]
        for k, r in enumerate(refs):
            r["ids"].append(int(np.argmax(ref_rows[k])))
            r["scale"].append(float(np.max(np.abs(ref_rows[k]))))
        for i, r in enumerate(alive):
            row = logits[len(refs) + i]
            r.ids.append(int(np.argmax(row)))
            r.abs_err.append(float(np.max(np.abs(row - ref_rows[r.prompt]))))
            r.largest = max(r.largest, largest[i])
        if step + 1 < n_new:
            for r in refs:
                r["seq"].append(r["ids"][-1])
            for r in alive:
                r.seq.append(r.ids[-1])
        if callback is not None:
            callback(step)
    out = [dict(ids=np.asarray(r["ids"], np.int64), scale=np.asarray(r["scale"])) for r in refs]
    return out, runs


def _ctx_steps(model, seqs, before):
    """The with-context values at the last token of every distinct sequence: one batched
    cached step (:func:`~minipatch.decode.step_many`) from the prefixes' entries in
    ``before``; a prefill for a bare prompt."""
    xp = model.xp
    out, todo = {}, {}
    for s in seqs:
        key = tuple(s)
        if key in out or key in todo:
            continue
        if key[:-1] in before:
            todo[key] = before[key[:-1]]["cache"]
            continue
        trace = {}
        xf, cache = model.prefill(np.asarray(s, np.int64), trace=trace, head=False)
        out[key] = _entry(xp, cache, xp.reshape(xf, (1, -1)), trace["embed"], trace["layers"], len(s) - 1, key)
    if todo:
        keys = list(todo)
        xf, caches, embed, layers = step_many(model, [todo[k] for k in keys], [k[-1] for k in keys])
        for i, key in enumerate(keys):
            final = take_rows(xf, xp.asarray([i], device=device(xf)))
            out[key] = _entry(xp, caches[i], final, embed, layers, i, key)
    return out


def _entry(xp, cache, final, embed, layers, row, key):
    """A memo entry: the sequence's cache, and its final hidden [1, D], embedding and layer
    values at its last token (row ``row`` of ``embed`` and ``layers``)."""
    one = xp.asarray([row], device=device(embed))
    return dict(cache=cache, final=final, embed=take_rows(embed, one),
                layers=[{k: take_rows(lay[k], one) for k in VALUES} for lay in layers], position=len(key) - 1)


def _cat(parts):
    """Rows of several arrays (or of MoE hidden dicts) stacked."""
    if isinstance(parts[0], dict):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return namespace(parts[0]).concat(parts, axis=0)


def _patched_rows(model, alive, memo, patch_fn):
    """One step of every alive run's patched model. A run whose construction fails gets its
    ``error`` and leaves the batch (the layer is redone without it).

    Returns:
      (final normed hidden [R', D] of the runs that went through, their indices into
      ``alive``, their largest |scale patch| of this step).
    """
    xp, cfg = model.xp, model.cfg
    keep = list(range(len(alive)))
    ctx = [memo[tuple(r.seq)] for r in alive]
    stream = _cat([c["embed"] for c in ctx]) if keep else None
    largest = np.zeros(len(alive))

    def drop(j, error, rows):
        """Run keep[j] stops with ``error``; ``rows`` ([R, ...]) without its row."""
        nonlocal keep
        alive[keep[j]].error = f"{type(error).__name__}: {error}"
        rest = [i for i in range(len(keep)) if i != j]
        keep = [keep[i] for i in rest]
        return take_rows(rows, xp.asarray(rest, device=device(rows))) if keep else None

    l = 0
    while keep and l < cfg.n_layers:
        try:
            stream, sizes = _layer(model, l, [alive[i] for i in keep], [ctx[i] for i in keep], stream, patch_fn)
        except _RowFailed as f:
            stream = drop(f.row, f.error, stream)
            continue
        largest[keep] = np.maximum(largest[keep], sizes)
        l += 1
    xf = norm(model.params, "final_norm", stream, cfg) if keep else None
    while keep and not all_finite(xf):
        bad = first_row(xf)
        xf = drop(bad, NonFiniteError("final norm output", position=ctx[keep[bad]]["position"],
                                      hint="check final_norm.weight"), xf)
    return xf, keep, largest[keep]


def _layer(model, l, runs, ctx, stream, patch_fn):
    """Layer ``l`` for the rows of ``runs``: each row's patch (built on its own stream in the
    closed loop, on the with-context stream in the open loop) and the patched model's output.

    Returns:
      (stream [R, D] after the layer, per row the largest |scale patch|). Raises _RowFailed.
    """
    xp, spec, cfg, lp = model.xp, model.spec, model.cfg, model.params["layers"][l]
    dev = device(stream)
    R = len(runs)
    pos = np.asarray([c["position"] for c in ctx], np.int64)
    is_open = np.asarray([r.order == "open" for r in runs])
    opened = np.flatnonzero(is_open)
    ctx_l = {k: _cat([c["layers"][l][k] for c in ctx]) for k in VALUES}
    build = xp.where(xp.asarray(is_open[:, None], device=dev), ctx_l["x"], stream)
    # attention values of [construction rows; open rows' own stream]; ``own`` points at each
    # row's values on its own stream (the construction rows for the closed loop)
    both = build if opened.size == 0 else xp.concat([build, take_rows(stream, xp.asarray(opened, device=dev))], axis=0)
    at = own_attention_values(spec, lp, both, cfg)
    own = np.arange(R)
    own[opened] = R + np.arange(opened.size)
    own = xp.asarray(own, device=dev)
    z_own, a_own = take_rows(at.z, own), take_rows(at.a, own)
    groups = {}
    for i, r in enumerate(runs):
        groups.setdefault(r.method if r.method != "auto" else ("auto", i), []).append(i)
    # the theorem (M8) row-group-wise: the inner witness (M1, the same for every construction)
    # once for all rows, the outer witness per construction on its rows
    z, z_ctx, h, delta = theorem_inputs(spec, lp, cfg, {"x": build, "a": at.a[:R, ...], "z": at.z[:R, ...]}, ctx_l)
    with _failing_row(l, pos, list(range(R))):
        inner = {} if z_ctx is None else spec.inner.witness(lp, z, z_ctx, cfg)
    sizes, parts, order = np.zeros(R), [], []
    for key, rows in groups.items():
        g = xp.asarray(rows, device=dev)
        patch = take_layer_rows(inner, rows)
        if delta is not None:
            with _failing_row(l, pos, rows):
                _, out = spec.outer.witness(lp, take_rows(h, g), take_rows(delta, g), cfg,
                                            key if isinstance(key, str) else "auto")
            patch.update(out)
        sizes[rows] = scale_sizes(patch, len(rows))       # as built, before patch_fn
        if patch_fn is not None:
            patch = patch_fn(patch)
        try:
            check_patch_finite(patch, l, pos[rows])
        except MinipatchError as e:
            raise _RowFailed(rows[_first_bad_row(patch)], e) from e
        parts.append(patch)
        order.extend(rows)
    # every row through the MLP at once, each with its own construction's patch
    g = xp.asarray(order, device=dev)
    vals = dict(x=take_rows(stream, g), a=take_rows(a_own, g), z=take_rows(z_own, g))
    ml = mlp_values(spec, lp, vals["x"], vals["z"], vals["a"], cfg, stack_patches(parts))
    if not all_finite(ml.out):
        bad = first_row(ml.out)
        one = xp.asarray([bad], device=dev)
        vals.update(h=ml.h, d=ml.d, m=ml.m, out=ml.out)
        try:
            check_values({k: take_rows(v, one) for k, v in vals.items()}, l, pos[[order[bad]]])
        except MinipatchError as e:
            raise _RowFailed(order[bad], e) from e
    inverse = np.empty(R, np.int64)
    inverse[np.asarray(order)] = np.arange(R)
    return take_rows(ml.out, xp.asarray(inverse, device=dev)), sizes


@contextmanager
def _failing_row(layer, pos, rows):
    """A NotControllableError of the witness run on ``rows`` as the _RowFailed of that row,
    named as the run alone would name it (layer, the token's position)."""
    try:
        yield
    except NotControllableError as e:
        row = rows[e.position] if e.position is not None else rows[0]
        raise _RowFailed(row, NotControllableError(e.quantity, e.value, layer=layer, position=int(pos[row]),
                                                   hint=e.hint)) from e


def scale_sizes(patch, n):
    """Per token row of a layer patch (``n`` rows), the largest |scale patch|: M6a/M6c/M6d's
    additive ``add``, M6b's multiplicative ``mul`` as |mul - 1| (0 where there is none): the
    number that multiplies rounding (MATH.md M6d, M7)."""
    out = np.zeros(n)
    for p in patch.values():
        if isinstance(p, Scale):
            for a, off in ((p.add, 0.0), (p.mul, 1.0)):
                if a is not None:
                    v = np.abs(to_numpy(a) - off).reshape(n, -1)
                    out = np.maximum(out, v.max(axis=1))
    return out


def _first_bad_row(patch):
    for p in patch.values():
        for arr in vars(p).values():
            if arr is not None and not all_finite(arr):
                return first_row(arr)
    return 0
