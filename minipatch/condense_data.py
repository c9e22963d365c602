"""What the condensation forms are fitted to: the calibration queries' token-dependent patches,
packed (MATH.md M7 and T5), and the edits the forms T1-T4 build from them.

For calibration queries packed behind the demonstrations (with context) and behind <bos> and
HEAD alone (without), :func:`collect` returns two :class:`Calibration` sets (MATH.md T5):

- ``"all"``: M7 in closed loop over the packed rows without context, every layer patched: each
  layer's patch is built on the stream the patched model has there, so the patched run without
  demonstrations reproduces the with-context values at every kept row (exact, to rounding).
- ``"one"``: for each layer alone, the patch that takes that layer's output from the unedited
  stream without context to the with-context one (the other layers untouched).

Kept rows run at contiguous positions (<bos> at 0, the query right after HEAD), the positions
a zero-shot prompt has; every block theorem holds for any attention output without context,
so M7 is exact there too.

:func:`layer_edit` turns the rows of the first n calibration queries into one token-independent
change of one layer: T1 (a thought vector, a residual shift), T2 (least-squares thought
matrices), T3 (covariance-weighted ridge), T4 (T3 truncated to rank r); post-norm scales get the
least-squares constant multiplier given the condensed down-projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device, to_numpy
from .blocks.base import layer_patch, mlp_values
from .controllability import take_rows
from .errors import InputError
from .packed import Masks, attention_rows, run
from .patches import Rank1, Scale
from .thought import lstsq_patch, post_scale_fit
from .thought_forms import KeyCovariance, cov_ridge_patch, truncate

FORMS = ("vector", "lstsq", "ridge")


@dataclass(frozen=True)
class Calibration:
    """Token-dependent patches of calibration rows and what their fits need (one mode).

    Attributes:
      mode: 'all' or 'one' (module docstring).
      patches: per layer, dict parameter name -> Rank1 | Scale over the rows.
      h, m: per layer [R, F], [R, D]: the patched run's hidden and MLP output (post-norm fits).
      shift: per layer [R, D]: with-context layer output minus the unpatched layer's output on
        the same input (T1's targets).
      keys: per layer, dict weight name -> [P, in]: the weight's inputs at every prefix row of
        the with-context run (T3's key covariance).
      ends: int64 [B + 1]: the rows of the first n queries are rows[:ends[n]].
      unique: bool [R]: the row is the first with its token prefix. Two queries that start
        with the same token(s) ("South Africa", "South Korea") hold the same calibration token
        twice, equal up to float rounding; the fits use each token once (:meth:`rows`).
      streams: mode 'one': per layer, the unedited input stream [R, D] (to run from there).
      methods: per layer, the construction used.
    """

    mode: str
    patches: tuple
    h: tuple
    m: tuple
    shift: tuple
    keys: tuple
    ends: np.ndarray
    unique: np.ndarray
    streams: tuple = None
    methods: tuple = ()

    def rows(self, n):
        """Indices of the distinct calibration tokens of the first ``n`` queries."""
        return np.flatnonzero(self.unique[:int(self.ends[n])])


def unique_rows(pk):
    """bool [R]: row r is the first row of ``pk`` with its token prefix (the prefix rows are
    unique; a suffix row repeats an earlier one iff its suffix starts the same way)."""
    seen, out = set(), np.ones(pk.tokens.size, bool)
    for b in range(pk.n_suffixes):
        rows = pk.rows(b)
        for j, r in enumerate(rows):
            key = tuple(pk.tokens[rows[0]:r + 1].tolist())
            out[r] = key not in seen
            seen.add(key)
    return out


def _keys(model, layer, z, h):
    """Weight name -> key rows: the normalised MLP input for the weights the inner part reads,
    the hidden for the down-projection."""
    spec, p = model.spec, model.params["layers"][layer]
    n = spec.inner.normalize(p, z, model.cfg)
    out = {w + ".weight": n for w in spec.inner.reads(p)}
    down = getattr(spec.outer, "down", None)
    if down is not None:
        out[down + ".weight"] = h
    return out


def collect(model, ctx, noctx, kept, method="auto"):
    """Both calibration sets of one batch of queries (module docstring).

    Args:
      model: a :class:`~minipatch.model.Model` (dense MLPs: not MoE).
      ctx, noctx: :class:`~minipatch.icl_tasks.Batch` of the same queries with and without
        demonstrations; kept: rows of ``ctx`` matching every row of ``noctx``.
    Returns:
      (Calibration 'all', Calibration 'one', final with-context stream [R_ctx, D]).
    """
    if model.cfg.n_experts:
        raise InputError("condensation of mixture-of-experts layers is not supported")
    xp, spec, cfg = model.xp, model.spec, model.cfg
    dev = device(model.params["embed.weight"])
    trc = {}
    final_ctx = run(model, ctx.pack, trace=trc)
    K = xp.asarray(np.asarray(kept, np.int64), device=dev)
    P = xp.asarray(np.arange(ctx.pack.n_prefix), device=dev)
    crow = [{k: take_rows(t[k], K) for k in ("x", "a", "z", "h", "out")} for t in trc["layers"]]
    keys = tuple(_keys(model, l, take_rows(t["z"], P), take_rows(t["h"], P)) for l, t in enumerate(trc["layers"]))
    del trc
    ends = np.concatenate([[noctx.pack.n_prefix], noctx.pack.starts[1:]]).astype(np.int64)
    pos = xp.asarray(noctx.pack.positions, device=dev)
    masks = Masks(model, noctx.pack)
    tru = {}
    run(model, noctx.pack, trace=tru)
    modes = {"all": ([], [], [], [], []), "one": ([], [], [], [], [])}
    x = model.embed(xp.asarray(noctx.pack.tokens, device=dev), pos)
    for l, lp in enumerate(model.params["layers"]):
        tu = tru["layers"][l]
        at = attention_rows(model, l, x, pos, masks(cfg.window(l)))
        for mode, (xin, a, z) in (("all", (x, at.a, at.z)), ("one", (tu["x"], tu["a"], tu["z"]))):
            name, patch = layer_patch(spec, lp, cfg, {"x": xin, "a": a, "z": z}, crow[l], method)
            ml = mlp_values(spec, lp, xin, z, a, cfg, patch)
            base = mlp_values(spec, lp, xin, z, a, cfg).out if mode == "all" else tu["out"]
            for lst, v in zip(modes[mode], (patch, ml.h, ml.m, crow[l]["out"] - base, name)):
                lst.append(v)
            if mode == "all":
                x = ml.out                                      # closed loop: the patched stream
    streams = tuple(t["x"] for t in tru["layers"])
    out = []
    for mode, (pl, hl, ml_, sl, nl) in modes.items():
        out.append(Calibration(mode, tuple(pl), tuple(hl), tuple(ml_), tuple(sl), keys, ends, unique_rows(noctx.pack),
                               streams if mode == "one" else None, tuple(nl)))
    return out[0], out[1], final_ctx


@dataclass(frozen=True)
class LayerEdit:
    """One layer's token-independent change: ``deltas`` (name -> dense change, model dtype) or
    ``steer`` (a residual shift [D]); ``report``: per weight, residuals and chosen ridges."""

    deltas: dict
    steer: object
    report: dict


def _f64(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def layer_edit(model, cal, layer, n, form, ranks=()):
    """The T1-T4 edits of ``layer`` from the rows of the first ``n`` calibration queries.

    Args:
      cal: :class:`Calibration`. form: 'vector' (T1), 'lstsq' (T2) or 'ridge' (T3).
      ranks: for 'ridge', also the rank-r truncations (T4) of every weight.
    Returns:
      dict variant -> :class:`LayerEdit`: 'vector' / 'lstsq' / 'ridge', and 'ridge-r{r}'.
    """
    if form not in FORMS:
        raise InputError(f"form must be one of {FORMS}, got {form!r}")
    idx = cal.rows(n)
    rows = idx.size
    take = (lambda x: take_rows(x, model.xp.asarray(idx, device=device(x))))
    dt = np.dtype(str(model.dtype))
    if form == "vector":
        shift = _f64(take(cal.shift[layer]))
        return {"vector": LayerEdit({}, model.xp.asarray(shift.mean(0).astype(dt)), {"tokens": rows})}
    groups, scale_name = {}, None                    # weights that read the same input share one fit
    for name, p in cal.patches[layer].items():
        if isinstance(p, Scale):
            scale_name = name
        elif isinstance(p, Rank1) and p.v.ndim == 2:
            groups.setdefault(id(p.v), []).append(name)
        else:
            raise InputError(f"no condensation rule for the {type(p).__name__} patch of {name!r}")
    variants = {form: {}, **{f"ridge-r{r}": {} for r in (ranks if form == "ridge" else ())}}
    report, params = {}, model.params["layers"][layer]
    for names in groups.values():
        v = _f64(take(cal.patches[layer][names[0]].v))
        a = v / np.sum(v * v, axis=1, keepdims=True)                       # a_t = v_t / ||v_t||^2
        us = [_f64(take(cal.patches[layer][k].u)) for k in names]
        cuts = np.cumsum([0] + [u.shape[1] for u in us])
        e = np.concatenate(us, axis=1)
        if form == "lstsq":
            fit = lstsq_patch(a, e)
            rep = {"rel_residual": fit.rel_residual, "rank": fit.rank, "exact": fit.exact, "tokens": rows}
            parts = [(fit.dw[i:j].astype(dt), None) for i, j in zip(cuts[:-1], cuts[1:])]
        else:
            fit = cov_ridge_patch(a, e, KeyCovariance.from_keys(_f64(cal.keys[layer][names[0]])))
            rep = {"rel_residual": fit.rel_residual, "kappa": fit.kappa, "tokens": rows}
            left, right = fit.left.astype(dt), fit.right.astype(dt)        # products in the model dtype
            parts = [(left[i:j] @ right, left[i:j]) for i, j in zip(cuts[:-1], cuts[1:])]
        rqr = np.linalg.qr(right.T) if form == "ridge" and ranks else None
        for k, (dw, left) in zip(names, parts):
            w = _f64(params[k])
            report[k] = {**rep, "rel_norm": float(np.linalg.norm(dw) / np.linalg.norm(w))}
            variants[form][k] = dw
            if left is not None and ranks:
                for r, dr in truncate(left, right, ranks, right_qr=rqr).items():
                    variants[f"ridge-r{r}"][k] = dr
    out = {}
    for variant, dws in variants.items():
        deltas = {k: model.xp.asarray(dw) for k, dw in dws.items()}
        rep = dict(report)
        if scale_name is not None:
            down = model.spec.outer.down + ".weight"
            d, sf = post_scale_fit(model, layer, take(cal.h[layer]), take(cal.m[layer]), deltas.get(down))
            deltas[scale_name] = d
            rep[scale_name] = {"rel_residual": sf.rel_residual}
        out[variant] = LayerEdit(deltas, None, rep)
    return out


__all__ = ["FORMS", "Calibration", "unique_rows", "collect", "LayerEdit", "layer_edit"]
