"""Token-independent condensation of context patches: least-squares thought vectors and
thought matrices (MATH.md section 6; named after arXiv 2510.08734, whose exact formulas were
not available: these are LEAST-SQUARES FORMS, not that paper's construction).

- Thought vector: delta* = mean_t (y^C_t - y_t), the least-squares constant shift.
- Thought matrix: dW* = argmin_dW sum_t ||dW a_t - (R_t - W a_t)||^2
  = (R - A W^T)^T A (A^T A)^+  (optionally ridge: (A^T A + ridge I)^{-1}).
  It reproduces every token exactly iff the rows a_t are linearly independent (at most
  ``in`` tokens); otherwise it is a fit and its residual is reported. Linearly dependent
  calibration inputs with more room than rank (rank(A) < min(T, in)) make the fit
  non-unique: :class:`RankDeficientWarning` (the minimum-norm solution is returned).

:func:`condense` turns a model's token-dependent patches (M7, for one context and many
calibration queries) into one dense patch per weight; :func:`condensed_model` builds a new
:class:`~minipatch.model.Model` with W + dW*. Their evaluation (KL, top-1 agreement on held-out
queries: ``evaluate``, ``condensation_curve``, ``persona_experiment``) is in :mod:`minipatch.thought_eval`;
the further forms of MATH.md T3 and T4 (covariance-weighted ridge, rank-r truncation) are in
:mod:`minipatch.thought_forms`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .backend import device, namespace
from .errors import InputError, ShapeError
from .patches import Rank1, Scale, Shift


class RankDeficientWarning(UserWarning):
    """The calibration inputs of a thought matrix are linearly dependent (rank < min(T, in)):
    the least-squares patch is not unique; the minimum-norm one is returned."""


@dataclass(frozen=True)
class ThoughtVector:
    """Least-squares constant shift. delta [D]; residual = ||Y^C - Y - delta||_F; rel_residual
    divides by ||Y^C - Y||_F. n_tokens: T."""

    delta: object
    residual: float
    rel_residual: float
    n_tokens: int


@dataclass(frozen=True)
class ThoughtMatrix:
    """Least-squares token-independent patch (MATH.md section 6).

    Attributes:
      dw: [out, in]. residual: ||A dW*^T - E||_F with E = R - A W^T. rel_residual: over ||E||_F.
      rank: rank(A). n_tokens: T. exact: rows of A linearly independent (rank == T, no
        ridge), so dW* a_t = E_t for every t up to rounding.
    """

    dw: object
    residual: float
    rel_residual: float
    rank: int
    n_tokens: int
    exact: bool


def _check_finite(x, what):
    xp = namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise InputError(f"{what} contains NaN or inf")


def thought_vector(y_ctx, y):
    """Least-squares thought vector delta* = mean_t (y^C_t - y_t) (MATH.md section 6).

    Args:
      y_ctx, y: [T, D] with-context and without-context values (T >= 1).
    """
    xp = namespace(y_ctx, y)
    if y_ctx.shape != y.shape or y.ndim != 2:
        raise ShapeError(f"thought_vector: y_ctx {y_ctx.shape} and y {y.shape} must both be [T, D]")
    if y.shape[0] == 0:
        raise InputError("thought_vector: no tokens")
    diff = y_ctx - y
    _check_finite(diff, "y_ctx - y")
    delta = xp.mean(diff, axis=0)
    res = float(xp.sqrt(xp.sum((diff - delta) ** 2)))
    tot = float(xp.sqrt(xp.sum(diff * diff)))
    return ThoughtVector(delta, res, res / tot if tot > 0 else 0.0, int(y.shape[0]))


def lstsq_patch(a, e, ridge=0.0):
    """dW* = argmin ||A dW^T - E||_F^2 (+ ridge ||dW||_F^2) = E^T A (A^T A + ridge I)^+.

    Args:
      a: [T, in] inputs; e: [T, out] required changes of the output.
    Returns:
      :class:`ThoughtMatrix`.
    Warns:
      RankDeficientWarning: ridge == 0 and rank(A) < min(T, in).
    """
    xp = namespace(a, e)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ShapeError(f"lstsq_patch: a {a.shape} must be [T, in] and e {e.shape} [T, out]")
    T, n_in = a.shape
    if T == 0:
        raise InputError("thought matrix: the calibration set is empty")
    if ridge < 0:
        raise InputError(f"ridge must be >= 0, got {ridge}")
    _check_finite(a, "calibration inputs"), _check_finite(e, "calibration targets")
    if ridge == 0:
        # one SVD gives both the rank and the pseudo-inverse, with numpy's shared cutoff
        # max(T, in) * eps * s_max (that of matrix_rank and of pinv)
        uu, s, vt = xp.linalg.svd(a, full_matrices=False)
        tol = float(s[0]) * max(T, n_in) * float(xp.finfo(a.dtype).eps) if s.shape[0] else 0.0
        rank = int(xp.sum(xp.astype(s > tol, xp.int64)))
        dwt = vt[:rank, :].mT @ ((uu[:, :rank].mT @ e) / s[:rank, None])                 # [in, out]
        if rank < min(T, n_in):
            warnings.warn(
                f"thought matrix: calibration inputs have rank {rank} < min(T={T}, in={n_in}) "
                "(repeated or collinear tokens); the least-squares patch is not unique, "
                "returning the minimum-norm one", RankDeficientWarning, stacklevel=3)
    else:
        rank = int(xp.linalg.matrix_rank(a))
        eye = xp.eye(n_in, dtype=a.dtype, device=device(a))
        dwt = xp.linalg.solve(a.mT @ a + ridge * eye, a.mT @ e)
    res = float(xp.sqrt(xp.sum((a @ dwt - e) ** 2)))
    tot = float(xp.sqrt(xp.sum(e * e)))
    return ThoughtMatrix(dwt.mT, res, res / tot if tot > 0 else 0.0, rank, T, ridge == 0 and rank == T)


def thought_matrix(a, r, w, ridge=0.0):
    """Least-squares thought matrix (MATH.md section 6): dW* = (R - A W^T)^T A (A^T A)^+.

    Args:
      a: [T, in] per-token inputs a_t of W. r: [T, out] required outputs W a'_t.
      w: [out, in] the weight. ridge: optional ridge regularisation (>= 0).
    Returns:
      :class:`ThoughtMatrix` (``dw`` and the residual; exact only for independent a_t).
    """
    if w.ndim != 2 or a.shape[-1] != w.shape[-1] or r.shape[-1] != w.shape[0]:
        raise ShapeError(f"thought_matrix: a {a.shape}, r {r.shape}, w {w.shape} disagree")
    return lstsq_patch(a, r - a @ w.mT, ridge)


def rank1_fit(patch, ridge=0.0):
    """Thought matrix of a token-dependent :class:`Rank1` patch dW_t = u_t v_t^T.

    Every Rank1 of minipatch has v_t = a_t / ||a_t||^2 with a_t the weight's input in the
    patched run (M1: the context-free input; M2: the with-context hidden), so a_t is
    v_t / ||v_t||^2 and the required change dW_t a_t is u_t. Stacked expert weights with a
    shared v (u [T, E, out]) are fitted jointly.
    """
    xp = namespace(patch.u)
    u, v = patch.u, patch.v
    if v.ndim != 2:
        raise InputError("condensation of per-expert input patches (v [T, E, in]) is not supported")
    a = v / xp.sum(v * v, axis=-1, keepdims=True)
    if u.ndim == 2:
        return lstsq_patch(a, u, ridge)
    T, E, O = u.shape
    fit = lstsq_patch(a, xp.reshape(u, (T, E * O)), ridge)
    return ThoughtMatrix(xp.reshape(fit.dw, (E, O, v.shape[-1])), fit.residual, fit.rel_residual,
                         fit.rank, fit.n_tokens, fit.exact)


# ---- a whole model -----------------------------------------------------------------------

@dataclass(frozen=True)
class Condensed:
    """Dense token-independent patches of a context, one per patched parameter.

    Attributes:
      deltas: per layer, dict parameter name -> dense change (added to the parameter).
      fits: per layer, dict name -> ThoughtMatrix | ThoughtVector | ScaleFit.
      n_tokens: number of calibration (kept) tokens.
      method: the outer construction used for the token-dependent patches.
    """

    deltas: tuple
    fits: tuple
    n_tokens: int
    method: str

    @property
    def exact(self):
        """True when every weight's fit is exact (never for Scale or Shift fits with residual)."""
        return all(getattr(f, "exact", False) for lf in self.fits for f in lf.values())

    def max_rel_residual(self):
        return max((f.rel_residual for lf in self.fits for f in lf.values()), default=0.0)


@dataclass(frozen=True)
class ScaleFit:
    """Least-squares constant norm multiplier s* (per coordinate) fitted to the patched
    post-norm outputs: s*_d = sum_t u_td m_td / sum_t u_td^2 with u_t the unit-normalised
    (condensed) down-projection output and m_t the exact patched output."""

    scale: object
    residual: float
    rel_residual: float
    n_tokens: int
    exact: bool = False


def _cat(rows):
    return namespace(rows[0]).concat(rows, axis=0)


def condense(model, context, queries, method="auto", ridge=0.0):
    """Condense the patches of ``context`` over calibration ``queries`` (MATH.md section 6).

    For each query q the sequence context + q is absorbed (M7) with context = the first
    len(context) positions; the patched run gives each patched weight's per-token inputs
    and required changes. Per layer: every Rank1 patch -> least-squares dense dW*
    (:func:`rank1_fit`); every Shift -> thought vector (mean); every Scale (post-norm, M6) ->
    least-squares constant multiplier given the condensed down-projection (:class:`ScaleFit`).
    Inputs are those of the exact patched run (not re-fitted sequentially on the condensed
    model's own inputs).

    Args:
      model: any :class:`~minipatch.model.Model`. context: int tokens [n].
      queries: list of int token lists (the kept tokens follow the context).
      method: outer construction for :func:`~minipatch.absorb` ("auto": the first construction
        with a witness, MATH.md section 3; for Gemma most of the change goes into W_down and an
        elementwise residual into the norm scale).
      ridge: ridge of every thought matrix.
    Returns:
      :class:`Condensed`.
    """
    from .absorb import absorb, patched_forward
    from .validate import check_tokens

    ctx = check_tokens(context, model.cfg.vocab_size)
    if len(queries) == 0:
        raise InputError("condense: no calibration queries")
    qs = [check_tokens(q, model.cfg.vocab_size) for q in queries]
    n = ctx.size
    per_layer = [dict() for _ in range(model.cfg.n_layers)]
    traces = []
    for q in qs:
        seq = np.concatenate([ctx, q])
        res = absorb(model, seq, np.arange(n), method=method)
        tr = {}
        patched_forward(model, seq, res, trace=tr)
        traces.append(tr)
        for l, lp in enumerate(res.patches.layers):
            for name, pch in lp.items():
                per_layer[l].setdefault(name, []).append(pch)
    deltas, fits = [], []
    outer = model.spec.outer
    for l, named in enumerate(per_layer):
        dl, fl = {}, {}
        for name, ps in named.items():
            if isinstance(ps[0], Rank1):
                fit = rank1_fit(Rank1(_cat([q.u for q in ps]), _cat([q.v for q in ps])), ridge)
                dl[name], fl[name] = fit.dw, fit
            elif isinstance(ps[0], Shift):
                d = _cat([q.d for q in ps])
                fit = thought_vector(d, 0.0 * d)
                dl[name], fl[name] = fit.delta, fit
        for name, ps in named.items():
            if not isinstance(ps[0], Scale):
                continue
            if type(outer).__name__ != "RMSPostNormOuter" or name != outer.norm + ".weight":
                raise InputError(f"condense: no least-squares rule for a scale patch on {name!r}")
            h = _cat([tr["layers"][l]["h"] for tr in traces])
            m = _cat([tr["layers"][l]["m"] for tr in traces])
            dl[name], fl[name] = post_scale_fit(model, l, h, m, dl.get(outer.down + ".weight"))
        deltas.append(dl)
        fits.append(fl)
    return Condensed(tuple(deltas), tuple(fits), int(sum(q.size for q in qs)), method)


def post_scale_fit(model, layer, h, m, down_delta=None):
    """Least-squares constant post-norm multiplier of one layer (MATH.md section 6, T2).

        s*_k = sum_t u_tk m_tk / sum_t u_tk^2,   u_t = rms_unit(h_t (W_down + dW_down)^T)

    Args:
      model: a model whose MLP ends in a post-norm (Gemma, OLMo 2).
      layer: the layer. h: [T, F] hidden of the patched run; m: [T, D] its post-norm output.
      down_delta: the condensed change of W_down [D, F] (None: unchanged).
    Returns:
      (change of the norm parameter [D] = s* - s, :class:`ScaleFit`).
    """
    from .ops import rms_unit
    from .patches import linear

    outer, cfg = model.spec.outer, model.cfg
    if type(outer).__name__ != "RMSPostNormOuter":
        raise InputError(f"post_scale_fit: the {cfg.family} MLP has no post-norm")
    p = model.params["layers"][layer]
    xp = namespace(p[outer.norm + ".weight"])
    w_new = dict(p)
    if down_delta is not None:
        w_new[outer.down + ".weight"] = p[outer.down + ".weight"] + down_delta
    u = rms_unit(linear(w_new, outer.down, h), cfg.norm_eps)
    scale = xp.sum(u * m, axis=0) / xp.sum(u * u, axis=0)
    _check_finite(scale, f"least-squares scale of layer {layer}")
    g = p[outer.norm + ".weight"]
    s0 = g + cfg.norm_offset if cfg.norm_offset else g
    res = float(xp.sqrt(xp.sum((u * scale - m) ** 2)))
    tot = float(xp.sqrt(xp.sum(m * m)))
    return scale - s0, ScaleFit(scale, res, res / tot, int(h.shape[0]))


def condensed_model(model, deltas):
    """A NEW model with parameters W + dW (``deltas``: per layer dict name -> dense change, or a
    :class:`Condensed`). The original model and its arrays are not modified."""
    from .model import Model

    deltas = deltas.deltas if isinstance(deltas, Condensed) else deltas
    if len(deltas) != model.cfg.n_layers:
        raise ShapeError(f"deltas have {len(deltas)} layers, the model has {model.cfg.n_layers}")
    params = {k: v for k, v in model.params.items() if k != "layers"}
    layers = []
    for lp, dl in zip(model.params["layers"], deltas):
        new = dict(lp)
        for name, d in dl.items():
            if name not in lp:
                raise ShapeError(f"no parameter {name!r} to patch")
            if tuple(d.shape) != tuple(lp[name].shape):
                raise ShapeError(f"delta for {name!r} has shape {tuple(d.shape)}, parameter {tuple(lp[name].shape)}")
            new[name] = lp[name] + d
        layers.append(new)
    params["layers"] = layers
    return Model(model.cfg, params)


__all__ = ["RankDeficientWarning", "ThoughtVector", "ThoughtMatrix", "ScaleFit", "Condensed",
           "thought_vector", "thought_matrix", "lstsq_patch", "rank1_fit", "condense", "post_scale_fit",
           "condensed_model"]
