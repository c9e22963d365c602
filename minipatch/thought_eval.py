"""Evaluation of condensed context patches (MATH.md section 6): KL and top-1 agreement.

The least-squares thought vectors / thought matrices and :func:`~minipatch.thought.condense`
/ :func:`~minipatch.thought.condensed_model` live in :mod:`minipatch.thought`. :func:`evaluate` and :func:`condensation_curve` measure KL
and top-1 agreement against the with-context model on held-out queries;
:func:`persona_experiment` condenses a persona prompt of a real model and tests it on new
questions.
"""
from __future__ import annotations

import warnings

import numpy as np

from .backend import to_numpy
from .errors import InputError
from .thought import RankDeficientWarning, condense, condensed_model


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def evaluate(model, context, queries, other):
    """KL(p_ctx || p) and top-1 agreement on ``queries`` for ``other`` (e.g. the condensed model)
    run without context, next to the no-context baseline (``model`` without context).

    Queries keep their positions after the context. Returns a dict of floats: kl, top1,
    kl_base, top1_base (means over all query tokens), n_tokens.
    """
    from .validate import check_tokens

    ctx = check_tokens(context, model.cfg.vocab_size)
    n = ctx.size
    kl, kl0, t1, t10, cnt = 0.0, 0.0, 0.0, 0.0, 0
    for q in queries:
        q = check_tokens(q, model.cfg.vocab_size)
        pos = np.arange(n, n + q.size)
        lc = _log_softmax(np.asarray(to_numpy(model.forward(np.concatenate([ctx, q])))[n:], np.float64))
        lo = _log_softmax(np.asarray(to_numpy(other.forward(q, positions=pos)), np.float64))
        lb = _log_softmax(np.asarray(to_numpy(model.forward(q, positions=pos)), np.float64))
        pc = np.exp(lc)
        kl += float(np.sum(pc * (lc - lo)))
        kl0 += float(np.sum(pc * (lc - lb)))
        t1 += float(np.sum(lc.argmax(-1) == lo.argmax(-1)))
        t10 += float(np.sum(lc.argmax(-1) == lb.argmax(-1)))
        cnt += q.size
    if cnt == 0:
        raise InputError("evaluate: no query tokens")
    return dict(kl=kl / cnt, top1=t1 / cnt, kl_base=kl0 / cnt, top1_base=t10 / cnt, n_tokens=cnt)


def condensation_curve(model, context, calib, heldout, sizes, method="auto", ridge=0.0):
    """Held-out KL / top-1 of the condensed model as the calibration set grows.

    Args:
      calib: list of calibration queries; ``sizes``: numbers of them to use (increasing).
      heldout: list of held-out queries (never used for fitting).
    Returns:
      dict of numpy arrays over sizes: n_tokens, kl, top1, kl_base, top1_base, calib_kl
      (KL on the calibration queries themselves), max_rel_residual.
    """
    out = {k: [] for k in ("n_tokens", "kl", "top1", "kl_base", "top1_base", "calib_kl", "max_rel_residual")}
    for k in sizes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RankDeficientWarning)
            c = condense(model, context, calib[:k], method=method, ridge=ridge)
        cm = condensed_model(model, c)
        ev = evaluate(model, context, heldout, cm)
        out["n_tokens"].append(c.n_tokens)
        for key in ("kl", "top1", "kl_base", "top1_base"):
            out[key].append(ev[key])
        out["calib_kl"].append(evaluate(model, context, calib[:k], cm)["kl"])
        out["max_rel_residual"].append(c.max_rel_residual())
    return {k: np.asarray(v) for k, v in out.items()}


# ---- real models ------------------------------------------------------------------------------

def persona_experiment(model, encode, persona, train_questions, test_questions, method="auto", ridge=0.0):
    """Condense a persona context into dense patches and test it on new questions.

    Args:
      model: any Model (e.g. real Gemma 3 270M). encode: text -> int token ids (no BOS for
        questions; the persona should carry the BOS if the model wants one).
      persona: context text. train_questions / test_questions: lists of question texts.
    Returns:
      dict: the :class:`Condensed`, held-out metrics (:func:`evaluate`), calibration metrics.
    """
    ctx = np.asarray(encode(persona), dtype=np.int64)
    tr = [np.asarray(encode(q), dtype=np.int64) for q in train_questions]
    te = [np.asarray(encode(q), dtype=np.int64) for q in test_questions]
    c = condense(model, ctx, tr, method=method, ridge=ridge)
    cm = condensed_model(model, c)
    return dict(condensed=c, heldout=evaluate(model, ctx, te, cm), calib=evaluate(model, ctx, tr, cm))


__all__ = ["evaluate", "condensation_curve", "persona_experiment"]
