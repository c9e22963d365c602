"""The controllability framework (MATH.md section 5, M8; Goldwaser et al. 2025).

An MLP sublayer is ``out = z + g(f(z))``: ``f`` the *inner* part (pre-norm, up/gate
projections, activation, router), ``g`` the *outer* part (down-projections, expert
mixing, post-norm).

- ``f`` is input-controllable: for z != 0 and any z' there are parameters theta' with
  f_theta'(z) = f_theta(z'). Every inner part here reads its (normalized) input only
  through linear maps, so the witness is M1 on each of them with a shared v = n/||n||^2
  (:func:`inner_witness`).
- ``g`` is output-controllable: for h (!= 0) and any delta there are phi' with
  g_phi'(h) = g_phi(h) + delta. Witnesses: M2 on a weight (:func:`~minipatch.lemmas.m2`),
  a bias shift (:func:`bias_witness`), a post-norm scale (M6a/b/c/d, :mod:`minipatch.m6`),
  or M2 on expert down-projections (:mod:`minipatch.experts`).

**M8.** With both, ``z + g_phi'(f_theta'(z)) = z^C + g(f(z^C))`` where theta' comes from
(z, z^C) and phi' from (f(z^C), z^C - z): :func:`m8`.

Each part is a small frozen dataclass that declares its parameters (:meth:`shapes`), the
outer constructions it accepts (:meth:`methods`), its forward and its witness; the witness
itself is a plain function of arrays. Block families (``minipatch.blocks.families``) are
declarations of one inner and one outer part.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import m6
from .backend import namespace
from .errors import MethodError
from .lemmas import m1, m2, safe_sqnorm
from .ops import activation
from .patches import Shift, linear, norm


def take_rows(h, idx):
    """Rows ``idx`` (an index array) of an array or of every array in a dict (MoE hiddens)."""
    if isinstance(h, dict):
        return {k: take_rows(v, idx) for k, v in h.items()}
    return namespace(h).take(h, idx, axis=0)


def norm_shapes(name, dim, kind):
    """Parameter shapes of a norm: a scale, and a bias for LayerNorm."""
    return {name + ".weight": (dim,), **({name + ".bias": (dim,)} if kind == "layer" else {})}


def linear_shapes(name, out, inp, bias):
    return {name + ".weight": (out, inp), **({name + ".bias": (out,)} if bias else {})}


# ---- the witnesses, as plain functions of arrays -------------------------------------------

def inner_witness(weights, n, n_ctx):
    """Input controllability of a part that reads n only through linear maps (MATH.md M8 table).

        dW = (W (n^C - n)) n^T / ||n||^2 for every reading weight W (M1), v shared

    Then every W maps n to W n^C, so the part computes f(z^C) from z.

    Args:
      weights: dict name -> W [out, in] (or stacked experts [E, out, in]).
      n, n_ctx: [T, in] the (normalized) inputs without / with context.
    Returns:
      dict name -> Rank1.
    """
    v = n / safe_sqnorm(n, "||n||^2 (normalized MLP input)")
    return {name: m1(w, n, n_ctx, v=v) for name, w in weights.items()}


def bias_witness(delta):
    """Output controllability of a part with an output bias: b += delta (MATH.md M4, no condition)."""
    return Shift(delta)


# ---- input-controllable inner parts ------------------------------------------------------

@dataclass(frozen=True)
class Inner:
    """Base of inner parts: an optional pre-norm, then linear reads of the normalized input.

    Attributes:
      pre_norm: parameter name of the pre-norm (e.g. 'mlp_norm'), or None.
    """

    pre_norm: str | None = "mlp_norm"

    def reads(self, p):
        """Names of the weights that read the normalized input (M1 patches them)."""
        raise NotImplementedError

    def shapes(self, cfg):
        """name -> shape of this part's own parameters (the pre-norm only if it is its own)."""
        if self.pre_norm and self.pre_norm != "attn_norm":
            return norm_shapes(self.pre_norm, cfg.d_model, cfg.norm)
        return {}

    def normalize(self, p, z, cfg):
        return norm(p, self.pre_norm, z, cfg) if self.pre_norm else z

    def forward(self, p, z, cfg, patch=None):
        """The hidden f(z)."""
        return self.hidden(p, self.normalize(p, z, cfg), cfg, patch)

    def witness(self, p, z, z_ctx, cfg):
        """Input controllability: :func:`inner_witness` on the normalized inputs."""
        weights = {w + ".weight": p[w + ".weight"] for w in self.reads(p)}
        return inner_witness(weights, self.normalize(p, z, cfg), self.normalize(p, z_ctx, cfg))


@dataclass(frozen=True)
class LinearInner(Inner):
    """h = act(n W^T + b) (GPT-2, post-norm, vanilla blocks). M1 on W."""

    fc: str = "up_proj"
    act: str = "gelu_tanh"

    def reads(self, p):
        return (self.fc,)

    def shapes(self, cfg):
        return {**super().shapes(cfg), **linear_shapes(self.fc, cfg.d_ff, cfg.d_model, cfg.mlp_bias)}

    def hidden(self, p, n, cfg, patch=None):
        return activation(self.act)(linear(p, self.fc, n, patch))


@dataclass(frozen=True)
class IdentityActInner(LinearInner):
    """h = n W^T + b without activation (used by tests of the framework itself)."""

    def hidden(self, p, n, cfg, patch=None):
        return linear(p, self.fc, n, patch)


@dataclass(frozen=True)
class GatedInner(Inner):
    """h = act(n W_gate^T) * (n W_up^T) (GeGLU, SwiGLU, ReGLU). M1 on W_gate and W_up."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    act: str = "gelu_tanh"

    def reads(self, p):
        return (self.gate, self.up)

    def shapes(self, cfg):
        return {**super().shapes(cfg), **linear_shapes(self.gate, cfg.d_ff, cfg.d_model, cfg.mlp_bias),
                **linear_shapes(self.up, cfg.d_ff, cfg.d_model, cfg.mlp_bias)}

    def hidden(self, p, n, cfg, patch=None):
        return activation(self.act)(linear(p, self.gate, n, patch)) * linear(p, self.up, n, patch)


# ---- output-controllable outer parts -----------------------------------------------------

@dataclass(frozen=True)
class LinearOuter:
    """m = h W^T (+ b). Witness: M2 on W (``'m2'``, needs h != 0); with a bias also
    ``'bias'`` (b += delta, no condition), which ``'auto'`` uses where a hidden is zero."""

    down: str = "down_proj"
    bias: bool = False          # the output bias exists even without cfg.mlp_bias (M4)

    def shapes(self, cfg):
        return linear_shapes(self.down, cfg.d_model, cfg.d_ff, cfg.mlp_bias or self.bias)

    def methods(self, cfg):
        return ("auto", "m2", "bias") if (cfg.mlp_bias or self.bias) else ("auto", "m2")

    def forward(self, p, h, cfg, patch=None):
        return linear(p, self.down, h, patch)

    def parts(self, p, h, cfg, patch=None):
        """(down-projection output, part output): the same array here."""
        m = self.forward(p, h, cfg, patch)
        return m, m

    def witness(self, p, h, delta, cfg, method="auto"):
        if method == "bias" or (method == "auto" and self.down + ".bias" in p and _dead(h)):
            return "bias", {self.down + ".bias": bias_witness(delta)}
        return "m2", {self.down + ".weight": m2(h, delta, quantity="||h^C||^2 (MLP hidden)")}


def _dead(h):
    """True if some token's hidden is zero (to the dtype's smallest normal)."""
    xp = namespace(h)
    return bool(xp.any(xp.sum(h * h, axis=-1) <= xp.finfo(h.dtype).smallest_normal))


@dataclass(frozen=True)
class BiasOuter(LinearOuter):
    """m = h W^T + b with the bias witness b += delta (MATH.md M4)."""

    bias: bool = True

    def methods(self, cfg):
        return ("auto", "bias")

    def witness(self, p, h, delta, cfg, method="auto"):
        return "bias", {self.down + ".bias": bias_witness(delta)}


@dataclass(frozen=True)
class RMSPostNormOuter:
    """m = rms_s(h W_down^T), s = offset + g (Gemma's post-FFW norm, OLMo 2).

    Witness: one of the M6 constructions (:mod:`minipatch.m6`), chosen by ``method``.
    """

    down: str = "down_proj"
    norm: str = "mlp_post_norm"

    def shapes(self, cfg):
        return {**linear_shapes(self.down, cfg.d_model, cfg.d_ff, cfg.mlp_bias),
                **norm_shapes(self.norm, cfg.d_model, "rms")}

    def methods(self, cfg):
        return ("auto",) + m6.METHODS

    def forward(self, p, h, cfg, patch=None):
        return self.parts(p, h, cfg, patch)[1]

    def parts(self, p, h, cfg, patch=None):
        d = linear(p, self.down, h, patch)
        return d, norm(p, self.norm, d, cfg, patch, kind="rms")

    def multiplier(self, p, cfg):
        """s = offset + g, the unpatched post-norm multiplier [D]."""
        g = p[self.norm + ".weight"]
        return g + cfg.norm_offset if cfg.norm_offset else g

    def witness(self, p, h, delta, cfg, method="auto"):
        name, (down, scale) = m6.construct(method, self.multiplier(p, cfg), cfg.norm_eps, h,
                                           linear(p, self.down, h), delta)
        patch = {self.norm + ".weight": scale}
        if down is not None:
            patch[self.down + ".weight"] = down
        return name, patch


# ---- the general theorem -----------------------------------------------------------------

def check_method(outer, cfg, method):
    """Raise :class:`~minipatch.errors.MethodError` unless ``method`` is one of the outer part's."""
    allowed = outer.methods(cfg)
    if method not in allowed:
        raise MethodError(method, cfg.family, allowed)


def m8(inner, outer, p, cfg, z, z_ctx, h_ctx=None, delta=None, method="auto"):
    """The general theorem (MATH.md M8): one layer patch from the two witnesses.

        theta' from (z, z^C) (input controllability), phi' from (f(z^C), delta)
        (output controllability), so z + g'(f'(z)) = z + g(f(z^C)) + delta.

    Args:
      inner, outer: the block's declared parts. p: the layer's parameters. cfg: the config.
      z, z_ctx: [T, D] MLP inputs without / with context (``z_ctx=None``: the MLP input
        does not see the context, as in parallel blocks, and no inner patch is made).
      h_ctx: the hidden the outer part sees after the inner patch, f(z^C) (None: computed).
      delta: [T, D] what the outer part must add (z^C - z; Attn^C - Attn for parallel
        blocks), or None for no outer patch (the vanilla M3 block, whose output is g(f(z))).
      method: the outer witness, one of ``outer.methods(cfg)``.
    Returns:
      (name of the outer construction used, layer patch dict).
    Raises:
      MethodError: ``method`` is not one of the outer part's constructions.
    """
    check_method(outer, cfg, method)
    patch = {} if z_ctx is None else inner.witness(p, z, z_ctx, cfg)
    if delta is None:
        return "none", patch
    if h_ctx is None:
        h_ctx = inner.forward(p, z if z_ctx is None else z_ctx, cfg)
    name, out = outer.witness(p, h_ctx, delta, cfg, method)
    patch.update(out)
    return name, patch


def check_input_controllable(inner, p, cfg, z, z_target):
    """Executable definition: (max |f'(z) - f(z_target)| after the inner witness, patch)."""
    patch = inner.witness(p, z, z_target, cfg)
    return max_abs_diff(inner.forward(p, z, cfg, patch), inner.forward(p, z_target, cfg)), patch


def check_output_controllable(outer, p, cfg, h, delta, method="auto"):
    """Executable definition: (max |g'(h) - (g(h) + delta)| after the outer witness, patch)."""
    check_method(outer, cfg, method)
    _, patch = outer.witness(p, h, delta, cfg, method)
    return max_abs_diff(outer.forward(p, h, cfg, patch), outer.forward(p, h, cfg) + delta), patch


def max_abs_diff(a, b):
    """max |a - b| as a float; for MoE hiddens (dicts) over the parts the outer part reads
    (each expert's hidden counts only where its gate is nonzero)."""
    if isinstance(a, dict):
        a, b = _used(a), _used(b)
        return max(max_abs_diff(a[k], b[k]) for k in a)
    xp = namespace(a, b)
    return float(xp.max(xp.abs(a - b)))


def _used(h):
    """An MoE hidden with each expert's hidden zeroed where its gate is 0 (the outer part
    never reads it, and the M8 witness leaves unselected experts unpatched)."""
    if "gates" not in h:
        return h
    xp = namespace(h["gates"])
    on = (h["gates"] != 0)[:, :, None]
    return dict(h, experts=xp.where(on, h["experts"], xp.zeros_like(h["experts"])))


__all__ = [
    "Inner", "LinearInner", "GatedInner", "IdentityActInner",
    "LinearOuter", "BiasOuter", "RMSPostNormOuter",
    "inner_witness", "bias_witness", "m8", "check_method", "check_input_controllable",
    "check_output_controllable", "max_abs_diff", "take_rows", "norm_shapes", "linear_shapes",
]
