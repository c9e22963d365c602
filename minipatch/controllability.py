"""The controllability framework (MATH.md section 5, M8; Goldwaser et al. 2025).

An MLP sublayer is ``out = z + g(f(z))``: ``f`` the *inner* part (pre-norm, up/gate
projections, activation, router), ``g`` the *outer* part (down-projections, expert
mixing, post-norm).

- ``f`` is input-controllable: for z != 0 and any z' there are parameters theta' with
  f_theta'(z) = f_theta(z'). Every inner part here reads its (normalized) input only
  through linear maps, so the witness is M1 on each of them with a shared v = n/||n||^2.
- ``g`` is output-controllable: for h (!= 0) and any delta there are phi' with
  g_phi'(h) = g_phi(h) + delta. Witnesses: M2 on a weight, a bias shift, a post-norm
  scale (M6a/b/c/d), or M2 on expert down-projections (the MoE parts are in
  ``minipatch.experts``).

**M8.** With both, ``z + g_phi'(f_theta'(z)) = z^C + g(f(z^C))`` where theta' comes from
(z, z^C) and phi' from (f(z^C), z^C - z): :func:`m8`. Every block family in
``minipatch.blocks`` is a declaration of an inner and an outer part from this module.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import m6
from .backend import namespace
from .lemmas import m1, m2, safe_sqnorm
from .ops import activation
from .patches import Shift, linear, norm
from .errors import NotControllableError


def take_rows(h, idx):
    """Rows ``idx`` (an index array) of an array or of every array in a dict (MoE hiddens)."""
    if isinstance(h, dict):
        return {k: take_rows(v, idx) for k, v in h.items()}
    return namespace(h).take(h, idx, axis=0)


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

    def normalize(self, p, z, cfg):
        return norm(p, self.pre_norm, z, cfg) if self.pre_norm else z

    def forward(self, p, z, cfg, patch=None):
        """The hidden f(z)."""
        return self.hidden(p, self.normalize(p, z, cfg), cfg, patch)

    def witness(self, p, z, z_ctx, cfg, hidden_ctx=None):
        """Input controllability: M1 on every reading weight, shared v = n / ||n||^2.

        Then f'(z) = f(z^C): each weight W maps n to W n^C, and f depends on n only
        through those products.
        """
        n, n_ctx = self.normalize(p, z, cfg), self.normalize(p, z_ctx, cfg)
        v = n / safe_sqnorm(n, "||n||^2 (normalized MLP input)")
        return {w + ".weight": m1(p[w + ".weight"], n, n_ctx, v=v) for w in self.reads(p)}


@dataclass(frozen=True)
class LinearInner(Inner):
    """h = act(n W^T + b) (GPT-2, post-norm, vanilla blocks). M1 on W."""

    fc: str = "up_proj"
    act: str = "gelu_tanh"

    def reads(self, p):
        return (self.fc,)

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

    def hidden(self, p, n, cfg, patch=None):
        return activation(self.act)(linear(p, self.gate, n, patch)) * linear(p, self.up, n, patch)


# ---- output-controllable outer parts -----------------------------------------------------

@dataclass(frozen=True)
class LinearOuter:
    """m = h W^T (+ b). Witness: M2 on W (needs h != 0); where h = 0 and the layer has a
    bias, the bias witness ``b += delta`` (no condition) is used instead."""

    down: str = "down_proj"

    def forward(self, p, h, cfg, patch=None):
        return linear(p, self.down, h, patch)

    def witness(self, p, h, delta, cfg, method="auto"):
        if method == "bias" or (method == "auto" and self._dead(h) and self.down + ".bias" in p):
            return "bias", {self.down + ".bias": Shift(delta)}
        return "m2", {self.down + ".weight": m2(h, delta, quantity="||h^C||^2 (MLP hidden)")}

    @staticmethod
    def _dead(h):
        xp = namespace(h)
        return bool(xp.any(xp.sum(h * h, axis=-1) <= xp.finfo(h.dtype).smallest_normal))


@dataclass(frozen=True)
class BiasOuter(LinearOuter):
    """m = h W^T + b with the bias witness b += delta (MATH.md M4)."""

    def witness(self, p, h, delta, cfg, method="bias"):
        return "bias", {self.down + ".bias": Shift(delta)}


@dataclass(frozen=True)
class RMSPostNormOuter:
    """m = rms_s(h W_down^T), s = offset + g (Gemma's post-FFW norm, OLMo 2).

    Witness: one of the M6 constructions (``minipatch.m6``), chosen by ``method``.
    """

    down: str = "down_proj"
    norm: str = "mlp_post_norm"

    def forward(self, p, h, cfg, patch=None):
        return norm(p, self.norm, linear(p, self.down, h, patch), cfg, patch, kind="rms")

    def witness(self, p, h, delta, cfg, method="auto"):
        method = "auto" if method in (None, "m2", "bias") else method
        s = p[self.norm + ".weight"] + cfg.norm_offset if cfg.norm_offset else p[self.norm + ".weight"]
        m_ctx = linear(p, self.down, h)
        return m6.construct(method, s, cfg.norm_eps, h, m_ctx, delta,
                            down=self.down + ".weight", norm=self.norm + ".weight")


def _dev(x):
    from .backend import device

    return device(x)


# ---- the general theorem -----------------------------------------------------------------

def m8(inner, outer, p, cfg, z, z_ctx, h_ctx, delta, method="auto"):
    """The general theorem (MATH.md M8): one layer patch from the two witnesses.

    Args:
      inner, outer: the block's declared parts.
      p: the layer's parameters.
      z, z_ctx: [T, D] MLP inputs without / with context (``z_ctx=None``: the MLP input
        does not see the context, as in parallel blocks, and no inner patch is made).
      h_ctx: f(z^C), the with-context hidden at the kept tokens.
      delta: [T, D] what the outer part must add (z^C - z, or Attn^C - Attn for parallel).
      method: the outer witness ('auto', 'm6a', 'm6b', 'm6c', 'm2', 'bias', 'one', 'all').
    Returns:
      (name of the outer construction used, layer patch dict).
    """
    patch = {} if z_ctx is None else inner.witness(p, z, z_ctx, cfg, hidden_ctx=h_ctx)
    if delta is None:
        return "none", patch
    name, out = outer.witness(p, h_ctx, delta, cfg, method)
    patch.update(out)
    return name, patch


def check_input_controllable(inner, p, cfg, z, z_target):
    """Executable definition: max |f'(z) - f(z_target)| after the inner witness (should be ~0)."""
    patch = inner.witness(p, z, z_target, cfg, hidden_ctx=inner.forward(p, z_target, cfg))
    return _maxdiff(inner.forward(p, z, cfg, patch), inner.forward(p, z_target, cfg)), patch


def check_output_controllable(outer, p, cfg, h, delta, method="auto"):
    """Executable definition: max |g'(h) - (g(h) + delta)| after the outer witness."""
    _, patch = outer.witness(p, h, delta, cfg, method)
    return _maxdiff(outer.forward(p, h, cfg, patch), outer.forward(p, h, cfg) + delta), patch


def _maxdiff(a, b):
    """max |a - b|; for MoE hiddens (dicts) over the parts the outer part reads."""
    if isinstance(a, dict):
        a, b = _used(a), _used(b)
        return max(_maxdiff(a[k], b[k]) for k in a)
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


from .experts import MoEInner, MoEOuter, expert_linear  # noqa: E402  (MoE parts live in experts.py)

__all__ = [
    "Inner", "LinearInner", "GatedInner", "MoEInner", "IdentityActInner",
    "LinearOuter", "BiasOuter", "RMSPostNormOuter", "MoEOuter",
    "m8", "check_input_controllable", "check_output_controllable", "take_rows", "expert_linear",
    "NotControllableError",
]
