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
- :func:`model_dynamics`: a multi-layer model, prefix by prefix with :func:`~minipatch.absorb`
  (this loop over prefixes IS the online reading: each prefix needs its own M7 pass).

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

from .backend import device, namespace, to_numpy
from .errors import InputError, ShapeError
from .lemmas import safe_sqnorm
from .blocks.base import attention_output, mlp_input, project_qkv
from .ops import attention
from .patches import Rank1, Shift, norm


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
    if type(inner).__name__ == "MoEInner":
        raise InputError("block_dynamics: MoE blocks patch stacked expert weights; use model_dynamics")
    a = inner.normalize(p, z, model.cfg)
    return BlockDynamics(attn, a, {w + ".weight": implicit_steps(p[w + ".weight"], a) for w in inner.reads(p)})


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


# ---- real models (wired by the lead once the GGUF loader lands) ---------------------------

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


__all__ = ["Steps", "implicit_steps", "prefix_attention", "BlockDynamics", "block_dynamics",
           "first_block_dynamics", "ModelDynamics", "model_dynamics", "few_shot_dynamics"]
