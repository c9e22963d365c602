"""Implicit learning dynamics of a prompt (MATH.md M5; Dherin et al. 2025, arXiv 2507.16003).

Feed a context c_1..c_n to a contextual block T(C, x) = f(W A(C, x) + b) one token at a
time. With A_i = A(c_1..c_i, x) and the M1 patch dW_i of the prefix c_1..c_i (M3),

    dW_0 = 0,   dW_i - dW_{i-1} = h W (A_i - A_{i-1}) A_0^T = -h grad_W L_i(W),
    h = 1 / ||A_0||^2,   L_i(W) = trace(D_i^T W),   D_i = W (A_{i-1} - A_i) A_0^T (fixed).

Three levels:

- :func:`implicit_steps`: the M5 iterates of one weight from the rows A_0..A_n (any block).
- :func:`block_dynamics`: A_0..A_n of one model block for a query, all prefixes in ONE
  attention pass (queries x at their positions, keys = context plus one copy of x per row,
  a prefix mask), then :func:`implicit_steps` on every weight M1 patches (the MLP's inner
  reads: ``up_proj`` for vanilla M3 blocks, ``gate_proj``/``up_proj`` for Gemma/Llama, with
  A the normalized MLP input). Exactly M5, for any layer whose input is held fixed.
- :func:`~minipatch.dynamics_model.model_dynamics` (in :mod:`minipatch.dynamics_model`, with
  :class:`~minipatch.dynamics_model.ModelDynamics` and
  :func:`~minipatch.dynamics_model.few_shot_dynamics`): a multi-layer model, prefix by
  prefix with :func:`~minipatch.absorb`; that module's docstring says which part of each
  layer's increment is a gradient step and which is drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device, namespace, to_numpy
from .errors import InputError, ShapeError
from .lemmas import safe_sqnorm
from .blocks.base import attention_output, mlp_input, project_qkv
from .ops import attention
from .patches import Rank1, norm


# ---- M5 for one weight -------------------------------------------------------------------

@dataclass(frozen=True)
class Steps:
    """The M5 iterates of one weight W [out, in] (MATH.md M5).

    dW_i = u_i v^T with u_i = W (A_i - A_0), v = A_0 / ||A_0||^2, for i = 0..n (u_0 = 0).

    Attributes:
      w: [out, in] the weight. a: [n+1, in] the rows A_0..A_n. u: [n+1, out]. v: [in].
      lr: h = 1 / ||A_0||^2 (0-d array).
    """

    w: object
    a: object
    u: object
    v: object
    lr: object

    @property
    def n_steps(self):
        return self.u.shape[0] - 1

    @property
    def patches(self):
        """dW_0..dW_n as a :class:`Rank1` over the step axis (u [n+1, out], v [n+1, in])."""
        xp = namespace(self.u)
        return Rank1(self.u, xp.broadcast_to(self.v[None, :], (self.u.shape[0], self.v.shape[0])))

    @property
    def increments(self):
        """dW_i - dW_{i-1}, i = 1..n, as a :class:`Rank1` (same v: rank 1 each)."""
        xp = namespace(self.u)
        du = self.u[1:, :] - self.u[:-1, :]
        return Rank1(du, xp.broadcast_to(self.v[None, :], (du.shape[0], self.v.shape[0])))

    def loss_matrix(self, i):
        """D_i = W (A_{i-1} - A_i) A_0^T [out, in] (dense), the fixed matrix of L_i, i >= 1."""
        self._check_step(i)
        return (self.w @ (self.a[i - 1, :] - self.a[i, :]))[:, None] * self.a[0, :][None, :]

    def loss(self, i, w):
        """L_i(w) = trace(D_i^T w): the linear loss whose gradient step is the i-th increment."""
        xp = namespace(w)
        return xp.sum(self.loss_matrix(i) * w)

    def gd_step(self, i):
        """-h grad_W L_i = -h D_i [out, in] (dense); equals the i-th increment (M5)."""
        return -self.lr * self.loss_matrix(i)

    def patch_norms(self):
        """||dW_i||_F for i = 0..n (numpy [n+1])."""
        return np.linalg.norm(to_numpy(self.u), axis=-1) * float(np.linalg.norm(to_numpy(self.v)))

    def increment_norms(self):
        """||dW_i - dW_{i-1}||_F for i = 1..n (numpy [n])."""
        u = to_numpy(self.u)
        return np.linalg.norm(np.diff(u, axis=0), axis=-1) * float(np.linalg.norm(to_numpy(self.v)))

    def _check_step(self, i):
        if not 1 <= int(i) <= self.n_steps:
            raise InputError(f"step i must lie in 1..{self.n_steps}, got {i}")


def implicit_steps(w, a):
    """The M5 iterates of weight ``w`` for the input rows A_0..A_n (MATH.md M5, M1).

        dW_i = W (A_i - A_0) A_0^T / ||A_0||^2;   dW_i - dW_{i-1} = h W (A_i - A_{i-1}) A_0^T

    Args:
      w: [out, in] the weight that reads A (the MLP's first layer in M3).
      a: [n+1, in] row i is A(c_1..c_i, x); row 0 the context-free A(x), which must be nonzero.
    Returns:
      :class:`Steps`.
    Raises:
      NotControllableError: A_0 = 0 (no M1 witness). ShapeError: shapes disagree.
    """
    xp = namespace(w, a)
    if a.ndim != 2 or a.shape[-1] != w.shape[-1] or w.ndim != 2:
        raise ShapeError(f"implicit_steps: w {w.shape} must be [out, in] and a {a.shape} [n+1, in]")
    sq = safe_sqnorm(a[:1, :], "||A_0||^2 (context-free input)")[0, 0]
    u = (a - a[:1, :]) @ w.mT
    return Steps(w, a, u, a[0, :] / sq, xp.asarray(1.0, dtype=a.dtype, device=device(a)) / sq)


# ---- one block: all prefixes in one pass -------------------------------------------------

def prefix_attention(model, x_ctx, x_query, layer=0, ctx_positions=None, query_positions="append"):
    """A(c_1..c_i, x) for i = 0..n in one pass: the attention sublayer output of query x.

    Row i is what the block's attention sublayer outputs at x when the sequence is
    c_1..c_i, x. Queries: n+1 copies of x at ``query_positions``; keys/values: the n context
    tokens, then n+1 copies of x (one per row, at that row's position); mask row i: context
    keys j < i (and inside the sliding window) plus its own copy of x.
    einsum of the scores: 'TKGH,SKH->KGTS' with T = n+1, S = 2n+1.

    Args:
      model: a :class:`~minipatch.model.Model` (its ``layer``-th block is used).
      x_ctx: [n, D] the layer inputs of the context tokens. x_query: [D] the query's input.
      ctx_positions: int [n] (default 0..n-1).
      query_positions: 'append' (row i puts x at position i, right after the prefix: how an
        LM reads the prompt c_1..c_i x), 'fixed' (x at position n in every row), or int [n+1].
    Returns:
      (a [n+1, D] attention output (after its post-norm), z [n+1, D] the MLP input).
    """
    cfg, spec, p = model.cfg, model.spec, model.params["layers"][layer]
    xp = namespace(x_ctx, x_query)
    if x_ctx.ndim != 2 or x_query.shape != x_ctx.shape[-1:]:
        raise ShapeError(f"x_ctx {x_ctx.shape} must be [n, D], x_query {x_query.shape} [D]")
    n = x_ctx.shape[0]
    if n == 0:
        raise InputError("the context is empty: nothing to consume")
    dev = device(x_ctx)
    cpos = np.arange(n) if ctx_positions is None else np.asarray(to_numpy(ctx_positions), dtype=np.int64)
    if isinstance(query_positions, str):
        if query_positions not in ("append", "fixed"):
            raise InputError(f"query_positions must be 'append', 'fixed' or ints, got {query_positions!r}")
        after = cpos + 1                                   # right after c_i
        qpos = (np.concatenate([cpos[:1], after]) if query_positions == "append"
                else np.full(n + 1, after[-1]))
    else:
        qpos = np.asarray(to_numpy(query_positions), dtype=np.int64)
    if (cpos.shape != (n,) or qpos.shape != (n + 1,) or np.any(np.diff(cpos) <= 0)
            or np.any(qpos[1:] <= cpos) or cpos.min() < 0):
        raise InputError("positions: context strictly increasing and >= 0, the query of row i after c_i")
    xq = xp.broadcast_to(x_query[None, :], (n + 1, x_query.shape[0]))
    seq = xp.concat([x_ctx, xq], axis=0)                                   # [2n+1, D]
    pos = xp.asarray(np.concatenate([cpos, qpos]), device=dev)
    h_in = norm(p, "attn_norm", seq, cfg) if spec.attn_pre_norm else seq
    q, k, v = project_qkv(p, h_in, cfg, layer, pos)
    rows = np.arange(n + 1)[:, None]
    vis = np.zeros((n + 1, 2 * n + 1), dtype=bool)
    vis[:, :n] = np.arange(n)[None, :] < rows
    w = cfg.window(layer)
    if w:
        vis[:, :n] &= (qpos[:, None] - cpos[None, :]) < w
    vis[np.arange(n + 1), n + np.arange(n + 1)] = True
    o = attention(q[n:, ...], k, v, xp.asarray(vis, device=dev), cfg.score_scale, cfg.attn_softcap)
    a = attention_output(spec, p, o, cfg)
    return a, mlp_input(spec, p, xq, a, cfg)


@dataclass(frozen=True)
class BlockDynamics:
    """M5 for one block and one query: A rows and the iterates of every M1-patched weight.

    Attributes:
      attn: [n+1, D] attention-sublayer outputs A(c_1..c_i, x).
      a: [n+1, D] the M1 input rows (the normalized MLP input; = attn for vanilla M3 blocks).
      steps: dict weight name -> :class:`Steps`.
    """

    attn: object
    a: object
    steps: dict


def block_dynamics(model, x_ctx, x_query, layer=0, ctx_positions=None, query_positions="append"):
    """The implicit dynamics (M5) of block ``layer`` for a query fed its context token by token.

    For the vanilla M3 block (family 'vanilla_m3': T = f(W A(C, x) + b), W = ``up_proj``) this
    is Dherin et al.'s M5 literally. For any other block the M1-patched weights are the MLP's
    inner reads and A is their (normalized) input; parallel blocks' MLP never sees the
    context, so every iterate is 0 there.

    Args: as :func:`prefix_attention`.
    Returns:
      :class:`BlockDynamics`.
    """
    attn, z = prefix_attention(model, x_ctx, x_query, layer, ctx_positions, query_positions)
    p, inner = model.params["layers"][layer], model.spec.inner
    weights = {w + ".weight": p[w + ".weight"] for w in inner.reads(p)}
    stacked = [name for name, w in weights.items() if w.ndim != 2]
    if stacked:   # what the part reads decides, not its class: M5 is stated for one [out, in] weight
        raise InputError(f"block_dynamics: {stacked[0]} has shape {tuple(weights[stacked[0]].shape)}, "
                         "a stack of expert weights; use model_dynamics")
    a = inner.normalize(p, z, model.cfg)
    return BlockDynamics(attn, a, {name: implicit_steps(w, a) for name, w in weights.items()})


def first_block_dynamics(model, tokens, query_positions="append"):
    """:func:`block_dynamics` of layer 0 for ``tokens`` = context c_1..c_n followed by one query.

    Layer 0's input (the embedding) does not depend on the context, so this is M5 of the
    first block of a real model. Learned position embeddings move the query's input with
    its position: only ``query_positions='fixed'`` is M5 there.
    """
    from .validate import check_tokens

    tok = check_tokens(tokens, model.cfg.vocab_size)
    if tok.size < 2:
        raise InputError("need at least one context token and one query token")
    n = tok.size - 1
    if model.cfg.pos_embedding == "learned" and query_positions != "fixed":
        raise InputError("learned position embeddings: the query's input moves with 'append'; use 'fixed'")
    xp, dev = model.xp, device(model.params["embed.weight"])
    qp = n if isinstance(query_positions, str) else int(np.asarray(query_positions)[-1])
    x = model.embed(xp.asarray(tok, device=dev), xp.asarray(np.r_[np.arange(n), qp], device=dev))
    return block_dynamics(model, x[:n, :], x[n, :], 0, None, query_positions)


__all__ = ["Steps", "implicit_steps", "prefix_attention", "BlockDynamics", "block_dynamics",
           "first_block_dynamics"]
