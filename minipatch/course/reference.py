"""The solution key: every course function with the signature and docstring a student sees.

Each function delegates to the spine (the package's own construction), so grading the
reference is grading the package. A student's stub (``python -m minipatch assignment``) is
one of these with its body replaced by ``raise NotImplementedError``.

Conventions of every unit: arrays are numpy (float64 or float32; keep the input's dtype);
rows are tokens; a weight is ``[out, in]`` and acts as ``x @ W.T``. A rank-1 patch
``dW_t = u_t v_t^T`` per token is returned as the pair ``(u [T, out], v [T, in])`` (the
dense ``[T, out, in]`` and a :class:`minipatch.patches.Rank1` are accepted too). Where a
witness does not exist, raise :class:`minipatch.errors.NotControllableError` naming the
quantity, its value and the token ``position``; never return NaN or inf.
"""
from __future__ import annotations

from types import SimpleNamespace

from .. import controllability, lemmas, m6 as _m6
from ..dynamics import implicit_steps as _implicit_steps
from ..experts import MoEOuter

# The spine's functions as imported, so that grading (which may inject a submission into the
# spine's modules, see minipatch.course.adapt.injected) never routes the key back to itself.
_inner_witness, _m8 = controllability.inner_witness, controllability.m8
_constructions = dict(_m6.CONSTRUCTIONS)
_moe_witness = MoEOuter.witness


def _uv(r):
    return r.u, r.v


# ---- m1m2 ---------------------------------------------------------------------------------

def m1(w, a, a_ctx):
    """Rank-1 input absorption (MATH.md M1; Dherin et al. 2025).

        dW_t = (W (a'_t - a_t)) a_t^T / ||a_t||^2,   so (W + dW_t) a_t = W a'_t

    the minimum-Frobenius-norm solution (dW_t = residual @ pinv(a_t)).

    Args:
      w: [out, in] the weight that reads the input.
      a: [T, in] inputs without context (each row must be nonzero).
      a_ctx: [T, in] inputs with context.
    Returns:
      (u [T, out], v [T, in]) with u_t = W (a'_t - a_t), v_t = a_t / ||a_t||^2.
    Raises:
      NotControllableError: a row of ``a`` is zero (``position`` = that row).
    """
    return _uv(lemmas.m1(w, a, a_ctx))


def m2(h, delta):
    """Rank-1 output absorption (MATH.md M2).

        dW_t = delta_t h_t^T / ||h_t||^2,   so (W + dW_t) h_t = W h_t + delta_t

    the minimum-Frobenius-norm solution; it does not depend on W.

    Args:
      h: [T, in] inputs of the weight (each row must be nonzero).
      delta: [T, out] the required change of its output.
    Returns:
      (u [T, out], v [T, in]) with u_t = delta_t, v_t = h_t / ||h_t||^2.
    Raises:
      NotControllableError: a row of ``h`` is zero.
    """
    return _uv(lemmas.m2(h, delta))


# ---- m3m4 ---------------------------------------------------------------------------------

def m3(w, a, a_ctx):
    """Vanilla block without skip (MATH.md M3; Dherin et al. 2025).

    T(C, x) = f(W A(C, x) + b). With a = A(x) (attention without context) and
    a' = A(C, x) (with context): T(C, x) = f((W + dW) A(x) + b),

        dW_t = (W (a'_t - a_t)) a_t^T / ||a_t||^2.

    Args:
      w: [F, D] the MLP's first weight. a, a_ctx: [T, D] attention outputs without / with context.
    Returns:
      (u [T, F], v [T, D]), the patch of W.
    Raises:
      NotControllableError: a row of ``a`` is zero.
    """
    return _uv(_inner_witness({"w": w}, a, a_ctx)["w"])


def m4(w1, z, z_ctx):
    """Vanilla block with skip connection and biases (MATH.md M4).

    T = z + W2 f(W1 z + b1) + b2 with z = x + A(C, x): patch W1 by M1 from z to z^C and
    the output bias b2 += z^C - z.

    Args:
      w1: [F, D] the MLP's first weight. z, z_ctx: [T, D] MLP inputs without / with context.
    Returns:
      (u [T, F], v [T, D], d [T, D]): the patch of W1 and the shift of b2.
    Raises:
      NotControllableError: a row of ``z`` is zero.
    """
    u, v = _uv(_inner_witness({"w1": w1}, z, z_ctx)["w1"])
    return u, v, controllability.bias_witness(z_ctx - z).d


# ---- m5 -----------------------------------------------------------------------------------

def implicit_steps(w, a):
    """The implicit dynamics of one weight (MATH.md M5; Dherin et al. 2025).

    Row i of ``a`` is A_i = A(c_1..c_i, x), row 0 the context-free A_0 = A(x). The M1 patch
    of the prefix c_1..c_i is

        dW_i = W (A_i - A_0) A_0^T / ||A_0||^2 = u_i v^T,   dW_0 = 0.

    Args:
      w: [out, in]. a: [n+1, in], row 0 nonzero.
    Returns:
      (u [n+1, out] with u_i = W (A_i - A_0), v [in] = A_0 / ||A_0||^2, lr: h = 1 / ||A_0||^2
      as a 0-d array).
    Raises:
      NotControllableError: A_0 = 0. ShapeError: w is not [out, in] or a not [n+1, in].
    """
    s = _implicit_steps(w, a)
    return s.u, s.v, s.lr


def gd_step(w, a, i):
    """The i-th step of the implicit dynamics as a gradient step (MATH.md M5).

        dW_i - dW_{i-1} = -h grad_W L_i = h W (A_i - A_{i-1}) A_0^T,
        L_i(W) = trace(D_i^T W),  D_i = W (A_{i-1} - A_i) A_0^T (held fixed),  h = 1 / ||A_0||^2.

    Args:
      w: [out, in]. a: [n+1, in] as in :func:`implicit_steps`. i: step, 1 <= i <= n.
    Returns:
      [out, in] the dense step -h D_i.
    Raises:
      InputError: i outside 1..n. NotControllableError: A_0 = 0.
    """
    return _implicit_steps(w, a).gd_step(i)


# ---- m6 -----------------------------------------------------------------------------------

def _flat(p):
    return (None if p.down is None else _uv(p.down)), p.scale.add, p.scale.mul


def m6a(s, eps, h_ctx, m_ctx, delta):
    """M6a, the paper's construction (MATH.md M6a; Goldwaser et al. 2025).

    The post-norm must output t = s * u^C + delta, u^C = m^C / sqrt(mean((m^C)^2) + eps).
    With the inner part patched (the hidden is h^C), W_down is left alone and the
    multiplier s = 1 + g gets an elementwise patch per token:

        dg = delta / u^C,   so (s + dg) * u^C = s * u^C + delta.

    Args:
      s: [D] the post-norm multiplier. eps: its epsilon. h_ctx: [T, F] the hidden with
      context (unused here). m_ctx: [T, D] = h^C W_down^T. delta: [T, D] = y^C - y.
    Returns:
      (down, add, mul) = (None, dg [T, D], None).
    Raises:
      NotControllableError: a coordinate of u^C is zero to machine epsilon (|u| <= eps of
      the dtype): no finite witness.
    """
    return _flat(_constructions["m6a"](s, eps, h_ctx, m_ctx, delta))


def m6b(s, eps, h_ctx, m_ctx, delta):
    """M6b: M2 on W_down, then one scalar per token (MATH.md M6b).

    With t = s * u^C + delta: W_down += (v_t - m^C) (h^C)^T / ||h^C||^2 so it outputs
    v_t = t / s, then the multiplier s -> mul * s with mul = sqrt(mean(v_t^2) + eps) per
    token; the post-norm then outputs t exactly, eps included.

    Args: as :func:`m6a`.
    Returns:
      (down, add, mul) = ((u [T, D], v [T, F]), None, mul [T, 1]).
    Raises:
      NotControllableError: an entry of s is zero; a row of h^C is zero.
    """
    return _flat(_constructions["m6b"](s, eps, h_ctx, m_ctx, delta))


def trust_region(s, t):
    """Rows of y* = argmin ||s * y - t||^2 subject to mean(y^2) = 1 (MATH.md M6c).

    y = s t / (s^2 - mu) with mu < min(s^2) the root of mean(t^2 s^2 / (s^2 - mu)^2) = 1.
    Hard case (t s vanishes on the coordinates of smallest s^2 and no root exists):
    mu = min(s^2), those free coordinates filled equally to meet the constraint.

    Args:
      s: [D]; t: [T, D].
    Returns:
      y [T, D] in t's dtype, each row with mean(y^2) = 1.
    """
    return _m6.trust_region(s, t)


def m6c(s, eps, h_ctx, m_ctx, delta):
    """M6c, the stable variant (MATH.md M6c, and "M6c with exact zeros in s_vec").

    With t = s * u^C + delta and y* = trust_region(s', t) (s' = s with zero entries
    replaced by 1): W_down is patched (M2) to output h* = rho y*, rho = rms(m^C); with
    r = rms_unit(h*), the elementwise scale dg = (t - s r) / r absorbs the remainder
    (dg = 0 where r = 0, which needs t - s r = 0 there).

    Args: as :func:`m6a`.
    Returns:
      (down, add, mul) = ((u [T, D], v [T, F]), dg [T, D], None).
    Raises:
      NotControllableError: a row of h^C is zero; a nonzero remainder where r = 0.
    """
    return _flat(_constructions["m6c"](s, eps, h_ctx, m_ctx, delta))


def m6d(s, eps, h_ctx, m_ctx, delta):
    """M6d, well conditioned and total (MATH.md M6d).

    With t = s * u^C + delta, s_hat_i = sign(s_i) max(|s_i|, 0.1 rms(s)) (sign + where
    s_i = 0), y = t / s_hat: W_down is patched (M2) to output h* = rho y / rms(y),
    rho = rms(m^C); with r = rms_unit(h*), dg = (t - s r) / r (0 where r = 0, i.e. t = 0).
    Where |s_i| is above the floor dg_i = s_i (R - 1), one R per token.

    Args: as :func:`m6a`.
    Returns:
      (down, add, mul) = ((u [T, D], v [T, F]), dg [T, D], None).
    Raises:
      NotControllableError: a row of h^C is zero (nothing else: M6d is total).
    """
    return _flat(_constructions["m6d"](s, eps, h_ctx, m_ctx, delta))


# ---- m7 -----------------------------------------------------------------------------------

def m7(ctx, kept, attention, block_patch, mlp):
    """The multi-layer algorithm, closed loop (MATH.md M7).

    Layer by layer at the kept tokens: (1) the with-context values are the targets;
    (2) run layer l's attention sublayer on the stream the patched layers below produce,
    with the kept tokens alone; (3) build layer l's patch by the block theorem; then run the
    patched MLP to get the stream of layer l + 1. Layer 0's input is the embedding, which
    the context does not change: ctx[0]['x'] at the kept positions.

    Args:
      ctx: list of L dicts, layer l's with-context values at ALL positions: 'x' (input),
        'a' (attention output), 'z' (MLP input), 'h' (hidden), 'out' (output), each [T, ...].
      kept: int [T_K] the kept positions (indices into T).
      attention: attention(l, x, positions) -> (a, z): layer l's attention sublayer on
        x [n, D] at ``positions`` [n]; these tokens attend only to each other.
      block_patch: block_patch(l, noctx, ctx_kept) -> layer patch: noctx = {'x', 'a', 'z'}
        without context, ctx_kept = layer l's ctx values at the kept tokens (M6 / M8).
      mlp: mlp(l, x, a, z, patch) -> [n, D] layer l's output with the patch.
    Returns:
      list of L layer patches (as block_patch returned them).
    """
    x = ctx[0]["x"][kept]
    patches = []
    for l, values in enumerate(ctx):
        rows = {k: v[kept] for k, v in values.items()}
        a, z = attention(l, x, kept)
        patch = block_patch(l, {"x": x, "a": a, "z": z}, rows)
        x = mlp(l, x, a, z, patch)
        patches.append(patch)
    return patches


# ---- m8 -----------------------------------------------------------------------------------

_MOE = SimpleNamespace(family="moe")


class _Inner:
    """A student-level inner part: callables in place of a declared part."""

    def __init__(self, witness, f):
        self.witness_fn, self.f = witness, f

    def witness(self, p, z, z_ctx, cfg):
        return self.witness_fn(z, z_ctx)

    def forward(self, p, z, cfg, patch=None):
        return self.f(z) if patch is None else self.f(z, patch)


class _Outer:
    def __init__(self, witness, g=None):
        self.witness_fn, self.g = witness, g

    def methods(self, cfg):
        return ("auto",)

    def witness(self, p, h, delta, cfg, method="auto"):
        return "given", self.witness_fn(h, delta)

    def forward(self, p, h, cfg, patch=None):
        return self.g(h) if patch is None else self.g(h, patch)


def inner_witness(weights, n, n_ctx):
    """Input controllability of a part that reads n only through linear maps (MATH.md M8 table).

        dW = (W (n^C - n)) n^T / ||n||^2 for every weight W that reads n (M1), v shared

    Then every W maps n to W n^C, so the part computes f(z^C) from z.

    Args:
      weights: dict name -> W [out, in], or stacked experts [E, out, in] (MoE).
      n, n_ctx: [T, in] (normalized) inputs without / with context.
    Returns:
      dict name -> (u [T, out] (stacked: [T, E, out]), v [T, in]), one v for all.
    Raises:
      NotControllableError: a row of n is zero.
    """
    return {k: _uv(r) for k, r in _inner_witness(weights, n, n_ctx).items()}


def moe_outer_witness(gates, experts, delta, method="one"):
    """Output controllability of the MoE outer part m = sum_e w_e (h_e Wd_e^T) (MATH.md M8 table).

    'one': M2 on the down-projection of each token's highest-gate expert with delta / w_e.
    'all': M2 on every active expert's down-projection with delta / S, S = sum of the
    token's active gates as realised (1 after renormalisation, not for Qwen2-MoE: measure it).

    Args:
      gates: [T, E] gate weights (0 for unselected experts). experts: [T, E, F] expert hiddens.
      delta: [T, D]. method: 'one' or 'all'.
    Returns:
      (u [T, E, D], v [T, E, F]) for the stacked W_down [E, D, F] (zero rows for untouched experts).
    Raises:
      NotControllableError: an expert the witness uses has a zero hidden.
      MethodError: another method.
    """
    _, patch = _moe_witness(MoEOuter(), None, {"gates": gates, "experts": experts}, delta, _MOE, method)
    return _uv(patch["experts.down_proj.weight"])


def m8(input_witness, output_witness, f, z, z_ctx, delta):
    """The general theorem (MATH.md M8): one layer patch from the two witnesses.

        theta' from (z, z^C), phi' from (f(z^C), delta):  z + g'(f'(z)) = z + g(f(z^C)) + delta

    Args:
      input_witness(z, z_target) -> patch dict of the inner part.
      output_witness(h, delta) -> patch dict of the outer part.
      f(z) -> the hidden (a dict for MoE). z, z_ctx: [T, D] the MLP inputs without / with
      context; z_ctx None: the MLP does not see the context (parallel blocks), no inner
      patch, and the outer witness is taken at f(z).
      delta: [T, D] what the outer part must add (z^C - z), or None for no outer patch (M3).
    Returns:
      dict: the union of the two patch dicts.
    """
    _, patch = _m8(_Inner(input_witness, f), _Outer(output_witness), None, None,
                                  z, z_ctx, None, delta)
    return patch


def check_input_controllable(f, witness, z, z_target):
    """Input controllability as an executable definition (MATH.md section 5).

    Builds theta' = witness(z, z_target) and measures max |f_theta'(z) - f(z_target)|.

    Args:
      f: f(z, patch=None) -> hidden. witness(z, z_target) -> patch dict. z, z_target: [T, D].
    Returns:
      (error as a float, the patch dict).
    """
    return controllability.check_input_controllable(_Inner(witness, f), None, None, z, z_target)


def check_output_controllable(g, witness, h, delta):
    """Output controllability as an executable definition (MATH.md section 5).

    Builds phi' = witness(h, delta) and measures max |g_phi'(h) - (g(h) + delta)|.

    Args:
      g: g(h, patch=None) -> [T, D]. witness(h, delta) -> patch dict. h: the hidden. delta: [T, D].
    Returns:
      (error as a float, the patch dict).
    """
    return controllability.check_output_controllable(_Outer(witness, g), None, None, h, delta)


# ---- thought ------------------------------------------------------------------------------

def thought_vector(y_ctx, y):
    """Least-squares thought vector (MATH.md section 6): delta* = mean_t (y^C_t - y_t).

    Args:
      y_ctx, y: [T, D] with- and without-context values, T >= 1.
    Returns:
      delta [D].
    Raises:
      InputError: no tokens, or NaN / inf. ShapeError: shapes disagree.
    """
    from .. import thought

    return thought.thought_vector(y_ctx, y).delta


def thought_matrix(a, r, w, ridge=0.0):
    """Least-squares thought matrix (MATH.md section 6).

        dW* = argmin_dW sum_t ||dW a_t - (R_t - W a_t)||^2 (+ ridge ||dW||_F^2)
            = (R - A W^T)^T A (A^T A + ridge I)^+

    the minimum-norm solution when A is rank deficient (warn RankDeficientWarning from
    minipatch.thought when ridge = 0 and rank(A) < min(T, in)).

    Args:
      a: [T, in] per-token inputs. r: [T, out] required outputs W a'_t. w: [out, in].
      ridge: >= 0.
    Returns:
      dW* [out, in].
    Raises:
      InputError: no tokens, NaN / inf, ridge < 0. ShapeError: shapes disagree.
    """
    from .. import thought

    return thought.thought_matrix(a, r, w, ridge).dw
