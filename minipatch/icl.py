"""In-context linear regression with a linear-self-attention block (M3, M5; von Oswald et al.
2023; Dherin et al. 2025, arXiv 2507.16003, section on in-context regression).

Tokens z_j = (x_j, y_j) in R^{d+1} (P = d + 1), query z_q = (x_q, 0). One contextual block

    A(C, z_q) = z_q + (1/|C|) sum_{j in C} W_PV z_j (z_j^T W_KQ z_q)     (linear self-attention)
    T(C, z_q) = w_out . act(W A(C, z_q) + b)                              (MLP / readout; M3's W)

with A(z_q) = z_q for the empty context. The analytic construction (:func:`gd_block`):
W_KQ = [[I_d, 0], [0, 0]], W_PV = eta e_y e_y^T, W = e_y^T, act = identity, w_out = 1 gives

    T(C, z_q) = eta (1/N) sum_j y_j x_j . x_q = (w_0 - eta grad L(w_0)) . x_q,   w_0 = 0,
    L(w) = 1/(2N) sum_j (w . x_j - y_j)^2:

the forward pass is one gradient step on the in-context least-squares loss. The M3 patch of
W (:func:`implicit_update`, M1) moves the context into W: f((W + dW) z_q + b) = T(C, z_q).
Every prefix's A is one cumulative sum over the context (one causal pass, no loop).
Arrays may carry leading batch axes [..., N, d] (tasks); the hot paths use the array API.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device, namespace
from .dynamics import implicit_steps
from .errors import ShapeError
from .lemmas import safe_sqnorm
from .patches import Rank1


@dataclass(frozen=True)
class LSABlock:
    """Weights of the linear-self-attention block (module docstring).

    Attributes:
      w_kq: [P, P]. w_pv: [P, P]. w: [F, P] the MLP's first layer (M3's W). b: [F].
      w_out: [F] readout. act: 'identity' | 'relu' | 'tanh'.
    """

    w_kq: object
    w_pv: object
    w: object
    b: object
    w_out: object
    act: str = "identity"


_ACT = {
    "identity": (lambda x: x, lambda x: 1.0 + 0.0 * x),
    "tanh": (lambda x: namespace(x).tanh(x), lambda x: 1.0 - namespace(x).tanh(x) ** 2),
    "relu": (lambda x: namespace(x).where(x > 0, x, 0.0 * x), lambda x: namespace(x).astype(x > 0, x.dtype)),
}


def gd_block(d, eta=1.0, dtype=np.float64):
    """The analytic construction: a forward pass equals one GD step from w = 0 with rate eta."""
    P = d + 1
    w_kq = np.zeros((P, P), dtype)
    w_kq[:d, :d] = np.eye(d)
    w_pv = np.zeros((P, P), dtype)
    w_pv[d, d] = eta
    w = np.zeros((1, P), dtype)
    w[0, d] = 1.0
    return LSABlock(w_kq, w_pv, w, np.zeros(1, dtype), np.ones(1, dtype), "identity")


def random_block(d, hidden=16, seed=0, act="tanh", dtype=np.float64):
    """A block with random weights at realistic scale (biases nonzero) and a nonlinear MLP."""
    rng = np.random.default_rng(seed)
    P = d + 1
    g = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype)
    return LSABlock(g(P, P), g(P, P), g(hidden, P), (0.2 * rng.standard_normal(hidden)).astype(dtype),
                    g(hidden), act)


def sample_tasks(n_tasks, n_ctx, n_query, d, seed=0, noise=0.0, dtype=np.float64):
    """Linear-regression tasks: w ~ N(0, I_d), x ~ N(0, I_d), y = w . x + noise.

    Returns:
      dict x [B, N, d], y [B, N], xq [B, Q, d], yq [B, Q], w [B, d] (numpy).
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_tasks, d))
    x = rng.standard_normal((n_tasks, n_ctx, d))
    xq = rng.standard_normal((n_tasks, n_query, d))
    y = np.einsum("bnd,bd->bn", x, w) + noise * rng.standard_normal((n_tasks, n_ctx))
    yq = np.einsum("bqd,bd->bq", xq, w)
    return {k: v.astype(dtype) for k, v in dict(x=x, y=y, xq=xq, yq=yq, w=w).items()}


def tokens(x, y=None):
    """z = (x, y) [..., N, P]; y=None gives query tokens (x, 0)."""
    xp = namespace(x)
    y = xp.zeros(x.shape[:-1], dtype=x.dtype, device=device(x)) if y is None else y
    return xp.concat([x, y[..., None]], axis=-1)


def attention_prefixes(block, x, y, xq):
    """A(c_1..c_i, z_q) for every prefix i = 0..N and query, in one causal pass (cumulative sum).

    einsum: scores 'NP,PR,QR->QN', values 'NP,RP->NR'.

    Args:
      x: [..., N, d], y: [..., N] the context; xq: [..., Q, d] the queries.
    Returns:
      [..., Q, N+1, P].
    """
    xp = namespace(x, y, xq)
    if x.shape[:-1] != y.shape or xq.shape[-1] != x.shape[-1] or x.shape[-2] == 0:
        raise ShapeError(f"x {x.shape}, y {y.shape}, xq {xq.shape}: need [..., N>0, d], [..., N], [..., Q, d]")
    z, zq = tokens(x, y), tokens(xq)
    s = (z @ block.w_kq) @ xp.matrix_transpose(zq)                          # [..., N, Q]
    v = z @ block.w_pv.mT                                                   # [..., N, P]
    contrib = xp.matrix_transpose(s)[..., :, :, None] * v[..., None, :, :]  # [..., Q, N, P]
    csum = xp.cumulative_sum(contrib, axis=-2, include_initial=True)        # [..., Q, N+1, P]
    N = x.shape[-2]
    count = xp.asarray(np.maximum(np.arange(N + 1), 1), dtype=x.dtype, device=device(x))
    return zq[..., :, None, :] + csum / count[:, None]


def readout(block, a, patch=None):
    """T = w_out . act(W a + b) for inputs a [..., P] (optionally with a Rank1 patch on W)."""
    pre = a @ block.w.mT + block.b
    if patch is not None:
        xp = namespace(a)
        pre = pre + patch.u * xp.sum(patch.v * a, axis=-1, keepdims=True)
    return _ACT[block.act][0](pre) @ block.w_out


def predict(block, x, y, xq):
    """With-context predictions T(C, z_q) [..., Q]."""
    return readout(block, attention_prefixes(block, x, y, xq)[..., -1, :])


def predict_prefixes(block, x, y, xq):
    """Predictions after each prefix i = 0..N: [..., Q, N+1]."""
    return readout(block, attention_prefixes(block, x, y, xq))


def implicit_update(block, x, y, xq):
    """The M3 patch of W that absorbs the whole context (M1 on A(z_q) = z_q -> A(C, z_q)).

    dW_q = W (A(C, z_q) - z_q) z_q^T / ||z_q||^2, one per query.
    Returns:
      Rank1 with u [..., Q, F], v [..., Q, P].
    """
    a = attention_prefixes(block, x, y, xq)
    a0, aN = a[..., 0, :], a[..., -1, :]
    return Rank1((aN - a0) @ block.w.mT, a0 / safe_sqnorm(a0, "||z_q||^2 (query)"))


def predict_patched(block, patch, xq):
    """Without-context predictions of the patched block: w_out . act((W + dW) z_q + b)."""
    return readout(block, tokens(xq), patch)


def implicit_dynamics(block, x, y, xq):
    """M5 iterates for ONE query (x [N, d], y [N], xq [d]): :class:`~minipatch.dynamics.Steps`."""
    return implicit_steps(block.w, attention_prefixes(block, x, y, xq[None, :])[0])


def gd_prediction(x, y, xq, eta=1.0):
    """Explicit one-step GD from w = 0 on L(w) = 1/(2N) sum (w.x_j - y_j)^2, evaluated at xq."""
    xp = namespace(x, y, xq)
    w1 = eta * xp.sum(y[..., :, None] * x, axis=-2) / x.shape[-2]         # -eta grad L(0)
    return xp.sum(xq * w1[..., None, :], axis=-1)


def readout_loss(block, w, x, y):
    """l(W) = 1/(2N) sum_j (T_W(z_j^q) - y_j)^2: the examples used as context-free queries."""
    a = tokens(x)
    r = readout(LSABlock(block.w_kq, block.w_pv, w, block.b, block.w_out, block.act), a) - y
    return 0.5 * namespace(r).mean(r * r, axis=-1)


def readout_grad(block, x, y):
    """Hand-derived grad_W l at W = block.w [F, P] (x [N, d], y [N]):

        (1/N) sum_j r_j (w_out * act'(W a_j + b)) a_j^T,   a_j = (x_j, 0), r_j = T(a_j) - y_j.
    """
    a = tokens(x)
    pre = a @ block.w.mT + block.b
    r = _ACT[block.act][0](pre) @ block.w_out - y                          # [N]
    g = (r[:, None] * block.w_out[None, :] * _ACT[block.act][1](pre))      # [N, F]
    return g.mT @ a / x.shape[0]


def explicit_step(block, x, y, eta=1.0):
    """-eta grad_W l: explicit fine-tuning of W on the same examples [F, P] (dense)."""
    return -eta * readout_grad(block, x, y)


def condensed_update(block, x, y, xq, ridge=0.0):
    """One token-independent dW from the implicit updates of many queries (MATH.md section 6).

    Least squares over the queries of dW z_q = W (A(C, z_q) - z_q). The queries' last
    coordinate is 0, so the fit is over the x-block and dW's y-column is 0 (the minimum-norm
    choice). For :func:`gd_block` and at least d independent queries this recovers the
    explicit GD step exactly.

    Returns:
      (dW [F, P], :class:`~minipatch.thought.ThoughtMatrix` of the x-block fit).
    """
    from .thought import thought_matrix

    xp = namespace(x)
    d = x.shape[-1]
    aN = attention_prefixes(block, x, y, xq)[..., -1, :]
    fit = thought_matrix(xq, aN @ block.w.mT, block.w[:, :d], ridge=ridge)
    dw = xp.concat([fit.dw, xp.zeros((fit.dw.shape[0], 1), dtype=x.dtype, device=device(x))], axis=-1)
    return dw, fit


def cosine(a, b):
    """<a, b>_F / (||a||_F ||b||_F) of two arrays of the same shape (over all axes)."""
    xp = namespace(a, b)
    return float(xp.sum(a * b) / (xp.sqrt(xp.sum(a * a)) * xp.sqrt(xp.sum(b * b))))


__all__ = ["LSABlock", "gd_block", "random_block", "sample_tasks", "tokens", "attention_prefixes",
           "readout", "predict", "predict_prefixes", "implicit_update", "predict_patched",
           "implicit_dynamics", "gd_prediction", "readout_loss", "readout_grad", "explicit_step",
           "condensed_update", "cosine"]
