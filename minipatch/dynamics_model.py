"""Implicit learning dynamics of a multi-layer model consuming its prompt (MATH.md M5 + M7).

The one-weight / one-block M5 (:class:`~minipatch.dynamics.Steps`,
:func:`~minipatch.dynamics.block_dynamics`) lives in :mod:`minipatch.dynamics`; this module
reads a whole model prefix by prefix with :func:`~minipatch.absorb` (this loop over prefixes
IS the online reading: each prefix needs its own M7 pass).

What is and is not a gradient step in a multi-layer model. At layer l the M1 patch of
prefix i is dW_i = h_i W (a_i - o_i) o_i^T with o_i the layer's input WITHOUT context and
a_i WITH the prefix, both at the kept token. At layer 0, o_i = o does not depend on i
(RoPE models: the kept-only run is shift-invariant), so the increments are M5 exactly. At
deeper layers o_i is the kept-only attention applied to the with-prefix stream X_l^{C_i},
which changes with i. The increment splits as

    dW_i - dW_{i-1} = h_i W (a_i - a_{i-1}) o_i^T           (grad: -h_i grad L_i, L_i built on o_i)
                    + [dW_i - dW_{i-1} - grad]               (drift: o_i moved, zero iff o_i = o_{i-1})

so each layer's increment is a gradient step of a linear loss built on that layer's own
current A_0 = o_i plus a drift term; the sequence is not one online gradient descent on
fixed data. :class:`ModelDynamics` reports both parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_numpy
from .errors import InputError
from .patches import Rank1, Shift


# ---- multi-layer models ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDynamics:
    """Per-layer patches of growing prefixes (M7 at every prefix) and their increments.

    Index k runs over ``prefixes`` (prefix lengths, 0 first: dW = 0). Arrays are numpy,
    with a kept-token axis T_K last.

    Attributes:
      prefixes: int [P+1] prefix lengths, starting with 0.
      results: the :class:`~minipatch.absorb.AbsorbResult` of every prefix > 0.
      norms: per layer, dict name -> [P+1, T_K] ||dW||_F (Rank1), ||d|| (Shift), or the
        norm of the multiplier change (Scale).
      increments: per layer, dict name -> [P, T_K] the same norm of the increment.
      grad: per layer, for each M1-patched weight: [P, T_K] ||h_k W (a_k - a_{k-1}) o_k^T||_F.
      drift: same keys: [P, T_K] ||increment - grad||_F (0 at layer 0, see module docstring).
      lr: per layer [P+1, T_K] h_k = 1 / ||o_k||^2 (o_k: the layer's context-free M1 input).
    """

    prefixes: np.ndarray
    results: tuple
    norms: tuple
    increments: tuple
    grad: tuple
    drift: tuple
    lr: tuple


def _fro(terms):
    """||sum_k x_k y_k^T||_F for terms [(x [P, T, out], y [P, T, in]), ...] via Gram matrices."""
    tot = 0.0
    for xi, yi in terms:
        for xj, yj in terms:
            tot = tot + np.sum(xi * xj, axis=-1) * np.sum(yi * yj, axis=-1)
    return np.sqrt(np.maximum(tot, 0.0))


def _diff_fro(u1, v1, u0, v0):
    """||u1 v1^T - u0 v0^T||_F written as (u1 - u0) v1^T + u0 (v1 - v0)^T (no cancellation)."""
    return _fro([(u1 - u0, v1), (u0, v1 - v0)])


def model_dynamics(model, tokens, n_context, prefixes=None, method="auto"):
    """Per-layer implicit dynamics of a multi-layer model consuming its prompt (M5 + M7).

    ``tokens`` = context (first ``n_context`` tokens) followed by the kept query tokens. For
    each prefix length i, the sequence tokens[:i] + query is absorbed with context = its
    first i positions (:func:`~minipatch.absorb`, the query right after the prefix). The loop
    over prefixes is the online reading (one M7 pass per prefix); ``prefixes`` can select
    e.g. example boundaries of a few-shot prompt.

    Returns:
      :class:`ModelDynamics`. See the module docstring for what is a gradient step.
    """
    from .absorb import absorb
    from .validate import check_tokens

    tok = check_tokens(tokens, model.cfg.vocab_size)
    n = int(n_context)
    if not 1 <= n < tok.size:
        raise InputError(f"n_context must lie in 1..{tok.size - 1} (at least one context and one kept token)")
    pre = np.arange(1, n + 1) if prefixes is None else np.unique(np.asarray(prefixes, dtype=np.int64))
    if pre.size == 0 or pre.min() < 1 or pre.max() > n:
        raise InputError(f"prefixes must be nonempty and lie in 1..{n}")
    query = tok[n:]
    results = tuple(absorb(model, np.concatenate([tok[:i], query]), np.arange(i), method=method) for i in pre)
    # context-free M1 inputs of prefix 0: the model on the query alone
    trace = {}
    model.run(query, trace=trace, head=False)
    L = model.cfg.n_layers
    norms, incs, grads, drifts, lrs = [], [], [], [], []
    inner = model.spec.inner
    for l in range(L):
        p = model.params["layers"][l]
        o0 = to_numpy(inner.normalize(p, trace["layers"][l]["z"], model.cfg))      # [T_K, in]
        reads = {w + ".weight" for w in inner.reads(p)}
        nm, ic, gr, dr = {}, {}, {}, {}
        for name in results[0].patches.layers[l]:
            ps = [r.patches.layers[l][name] for r in results]
            if isinstance(ps[0], Rank1):
                U = np.stack([to_numpy(q.u) for q in ps])
                V = np.stack([to_numpy(q.v) for q in ps])
                if V.ndim < U.ndim:
                    V = np.broadcast_to(V[:, :, None, :], U.shape[:-1] + V.shape[-1:])
                U0 = np.concatenate([np.zeros_like(U[:1]), U])                    # dW_0 = 0
                V0 = np.concatenate([np.zeros_like(V[:1]), V])
                nrm = np.linalg.norm(U0, axis=-1) * np.linalg.norm(V0, axis=-1)
                if U.ndim == 4:   # stacked experts [P, T, E, .]: sum over the expert axis
                    nm[name] = np.sqrt(np.sum(nrm ** 2, axis=-1))
                    ic[name] = np.sqrt(np.sum(_diff_fro(U0[1:], V0[1:], U0[:-1], V0[:-1]) ** 2, axis=-1))
                    continue
                nm[name] = nrm
                ic[name] = _diff_fro(U0[1:], V0[1:], U0[:-1], V0[:-1])
                if name in reads:
                    W = to_numpy(p[name])
                    O = np.concatenate([o0[None], V / np.sum(V * V, axis=-1, keepdims=True)])  # o_k = v_k/||v_k||^2
                    Vo = O / np.sum(O * O, axis=-1, keepdims=True)
                    Wa = np.concatenate([(o0 @ W.T)[None], U + O[1:] @ W.T])       # W a_k = W o_k + u_k
                    gu = Wa[1:] - Wa[:-1]                                           # grad = gu v_k^T
                    gr[name] = np.linalg.norm(gu, axis=-1) * np.linalg.norm(V, axis=-1)
                    # drift = W (o_{k-1} - o_k) v_k^T + W (a_{k-1} - o_{k-1}) (v_k - v_{k-1})^T
                    c_prev = Wa[:-1] - O[:-1] @ W.T
                    dr[name] = _fro([((O[:-1] - O[1:]) @ W.T, V), (c_prev, V - Vo[:-1])])
                    if len(lrs) == l:   # h_k = 1/||o_k||^2
                        lrs.append(1.0 / np.sum(O * O, axis=-1))
            else:
                arr = []
                for q in ps:
                    if isinstance(q, Shift):
                        arr.append(to_numpy(q.d))
                    else:   # Scale: the change of the norm's multiplier s = offset + g
                        s0 = p[name] + model.cfg.norm_offset if model.cfg.norm_offset else p[name]
                        arr.append(to_numpy(q.multiplier(s0) - s0))
                D = np.concatenate([np.zeros_like(arr[0])[None], np.stack(arr)])
                D = D.reshape(D.shape[0], D.shape[1], -1)
                nm[name] = np.linalg.norm(D, axis=-1)
                ic[name] = np.linalg.norm(np.diff(D, axis=0), axis=-1)
        if len(lrs) == l:
            lrs.append(None)
        norms.append(nm), incs.append(ic), grads.append(gr), drifts.append(dr)
    return ModelDynamics(np.concatenate([[0], pre]), results, tuple(norms), tuple(incs), tuple(grads),
                         tuple(drifts), tuple(lrs))


# ---- real models ------------------------------------------------------------------------------

def few_shot_dynamics(model, encode, examples, query, prefix="", method="auto"):
    """A few-shot prompt consumed example by example: per-layer patch and increment norms.

    Args:
      model: any Model (e.g. real Gemma 3 270M). encode: text -> int token ids; it is called
        on ``prefix`` (may add BOS) and on each example / the query without BOS, by the caller's
        convention. examples: list of example texts. query: the final question text (kept).
    Returns:
      (:class:`ModelDynamics` with prefixes at the example boundaries, boundaries [E]).
    """
    parts = [np.asarray(encode(prefix), dtype=np.int64)] if prefix else []
    parts += [np.asarray(encode(e), dtype=np.int64) for e in examples]
    ctx = np.concatenate(parts)
    bounds = np.cumsum([p.size for p in parts])[(1 if prefix else 0):]
    tok = np.concatenate([ctx, np.asarray(encode(query), dtype=np.int64)])
    return model_dynamics(model, tok, ctx.size, prefixes=bounds, method=method), bounds


__all__ = ["ModelDynamics", "model_dynamics", "few_shot_dynamics"]
