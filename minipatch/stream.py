"""Blocks on a continuous stream: no tokens, no embedding, no head (MATH.md M3, M4, M7).

Another implementation's blocks may take a residual stream x [T, D] directly (a JAX peer's
vanilla blocks, say). The same :class:`~minipatch.model.Model` runs its blocks on such a stream:
the embedding, final norm and head are not used, and positions are optional (0..T-1; they
order the causal attention, and matter otherwise only for RoPE and sliding windows). With
``pos_embedding='none'`` a block reads no position at all.

    model = stream_model("vanilla_m4", d_model=16, n_layers=3, mlp_depth=4)
    y = run_stream(model, x)                            # [T, D], the last block's output
    res = absorb_stream(model, x, context=[1, 2, 3])    # M7 on the stream
    run_stream(model, x[res.kept], res.kept, res.patches) == y[res.kept]    # to rounding
"""
from __future__ import annotations

import numpy as np

from .absorb import VALUES, AbsorbResult, _check_args, _origin, patch_layers
from .backend import device, namespace, to_numpy
from .controllability import take_rows
from .errors import InputError, ShapeError
from .patches import Patches
from .validate import check_positions, split_context


def is_stream(x):
    """True for a floating [T, D] array (a stream), False for token ids."""
    try:
        kind = np.dtype(str(x.dtype)).kind
    except (AttributeError, TypeError):
        return False
    return kind == "f" and getattr(x, "ndim", 0) == 2


def check_stream(model, x):
    """``x`` as the model's array type if it is a finite [T, D] stream of the model's dtype."""
    if not is_stream(x):
        raise ShapeError(f"a stream must be a floating [T, D] array, got {getattr(x, 'dtype', type(x))} "
                         f"{getattr(x, 'shape', '')}")
    if x.shape[0] == 0 or x.shape[1] != model.cfg.d_model:
        raise ShapeError(f"stream has shape {tuple(x.shape)}, the model needs [T >= 1, {model.cfg.d_model}]")
    if str(x.dtype) != str(model.dtype):
        raise ShapeError(f"stream is {x.dtype}, the model {model.dtype}: cast one of them")
    xs = model.xp.asarray(x, device=device(model.params["embed.weight"]))
    xp = namespace(xs)
    if not bool(xp.all(xp.isfinite(xs))):
        raise InputError("the stream holds NaN or inf")
    return xs


def run_stream(model, x, positions=None, patches=None, trace=None, window_by="position"):
    """Every block on the stream x [T, D] at ``positions`` (default 0..T-1), with optional
    patches for exactly these positions; returns the last block's output [T, D].

    ``trace`` as in :meth:`Model.run` (``hidden_states[0]`` is x, ``hidden_states[L]`` the last
    block's output: there is no final norm).
    """
    xs = check_stream(model, x)
    pos_host = check_positions(positions, xs.shape[0], 1 << 62)
    pos = model.xp.asarray(pos_host, device=device(xs))
    index = model._index(window_by, 0, pos_host.size)
    layers = model._patch_layers(patches, pos_host, window_by)
    out, _ = model._stack(xs, pos, layers, index, None, trace, final=False)
    return out


def absorb_stream(model, x, context, method="auto", window_by="position", order="closed"):
    """M7 on a stream: patches for the kept positions such that
    ``run_stream(model, x[kept], kept, patches) == run_stream(model, x)[kept]``.

    Args as in :func:`minipatch.absorb.absorb`, with the stream x [T, D] for the tokens.
    Returns:
      :class:`~minipatch.absorb.AbsorbResult`.
    """
    _check_args(model, method, window_by, order)
    xs = check_stream(model, x)
    ctx, kept = split_context(context, xs.shape[0])
    trace = {}
    run_stream(model, xs, trace=trace, window_by=window_by)
    K = model.xp.asarray(kept, device=device(xs))
    rows = [{k: take_rows(tr[k], K) for k in VALUES} for tr in trace["layers"]]
    index = model._index(window_by, 0, kept.size)
    methods, layers, _, _ = patch_layers(model, take_rows(xs, K), K, kept, rows, index, None, method, order)
    patches = Patches(tuple(layers), kept, tuple(methods), _origin(model, window_by, order))
    return AbsorbResult(patches, kept, ctx, tuple(methods))


def stream_model(family, d_model=16, n_layers=2, mlp_depth=2, seed=0, dtype=np.float64, **kw):
    """A random model of ``family`` for streams: no positions (``pos_embedding='none'``), a
    vocabulary of one (the embedding and head are never used), realistic random weights."""
    from .models import tiny

    base = dict(vocab_size=1, d_model=d_model, n_layers=n_layers, n_heads=2, n_kv_heads=2,
                d_head=d_model // 2, d_ff=2 * d_model, pos_embedding="none", mlp_depth=mlp_depth)
    return tiny(family, seed=seed, dtype=dtype, **{**base, **kw})


def stream_output(model, x, **kw):
    """:func:`run_stream` as numpy (for notebooks)."""
    return to_numpy(run_stream(model, x, **kw))
