"""Mixture-of-experts parts on the controllability spine (MATH.md section 5, M8 table rows).

Inner: router plus experts (Mixtral, Qwen2-MoE, optionally a sigmoid-gated shared expert);
its witness is M1 on the router (same logits, so the same top-k and gates) and on each
selected expert's gate/up. Outer: the gate-weighted sum of expert down-projections; its
witness is M2 on one selected expert's down-projection with delta / w_e, or on every active
expert with delta / S, S the realised sum of the active gates.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backend import device, namespace
from .controllability import Inner, linear_shapes
from .errors import MethodError
from .lemmas import first_bad
from .ops import activation, sigmoid, softmax
from .patches import Rank1, linear


@dataclass(frozen=True)
class MoEInner(Inner):
    """Router plus experts (Mixtral, Qwen2-MoE), optionally a sigmoid-gated shared expert.

    Gates: softmax over all E router logits, keep the top_k (ties: the lower expert index
    wins, a stable sort), renormalise them if ``cfg.moe_renormalize`` (Mixtral) or not
    (Qwen2-MoE). Each expert is a gated MLP ``act(n Wg_e^T) * (n Wu_e^T)``; all experts are
    evaluated (batched matmul) and unselected ones get gate 0.

    The hidden is a dict: gates [T, E], experts [T, E, F], and with a shared expert
    shared [T, F_s], shared_gate [T, 1].

    Witness: M1 on the router (same logits, so the same top-k and gates) and on each
    expert's gate/up (zero rows for experts a token does not select), and on the shared
    expert and its gate.
    """

    act: str = "silu"

    def reads(self, p):
        names = ["router", "experts.gate_proj", "experts.up_proj"]
        if "shared.gate_proj.weight" in p:
            names += ["shared.gate_proj", "shared.up_proj", "shared_gate"]
        return tuple(names)

    def shapes(self, cfg):
        D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
        s = {**super().shapes(cfg), "router.weight": (E, D), "experts.gate_proj.weight": (E, F, D),
             "experts.up_proj.weight": (E, F, D)}
        if cfg.d_ff_shared:
            Fs = cfg.d_ff_shared
            for name, out, inp in (("shared.gate_proj", Fs, D), ("shared.up_proj", Fs, D), ("shared_gate", 1, D)):
                s.update(linear_shapes(name, out, inp, False))
        return s

    def hidden(self, p, n, cfg, patch=None):
        xp = namespace(n)
        act = activation(self.act)
        probs = softmax(linear(p, "router", n, patch), axis=-1)              # [T, E]
        order = xp.argsort(probs, axis=-1, descending=True, stable=True)
        top = order[:, : cfg.top_k]
        E = probs.shape[-1]
        sel = xp.any(top[:, :, None] == xp.arange(E, device=device(n))[None, None, :], axis=1)
        gates = xp.where(sel, probs, xp.zeros_like(probs))
        if cfg.moe_renormalize:
            gates = gates / xp.sum(gates, axis=-1, keepdims=True)
        g = expert_linear(p, "experts.gate_proj", n, patch)                  # [T, E, F]
        u = expert_linear(p, "experts.up_proj", n, patch)
        h = {"gates": gates, "experts": act(g) * u}
        if "shared.gate_proj.weight" in p:
            h["shared"] = act(linear(p, "shared.gate_proj", n, patch)) * linear(p, "shared.up_proj", n, patch)
            h["shared_gate"] = sigmoid(linear(p, "shared_gate", n, patch))
        return h

    def witness(self, p, z, z_ctx, cfg):
        """M1 on every reading weight (:func:`~minipatch.controllability.inner_witness`),
        keeping only the rows of the experts each token selects with context."""
        patch = Inner.witness(self, p, z, z_ctx, cfg)
        xp = namespace(z)
        gates = self.forward(p, z_ctx, cfg)["gates"]
        on = xp.astype(gates != 0, z.dtype)[:, :, None]
        for w in ("experts.gate_proj.weight", "experts.up_proj.weight"):
            r = patch[w]
            patch[w] = type(r)(r.u * on, r.v)
        return patch


def expert_linear(p, name, x, patch=None):
    """Stacked expert weights W [E, out, in] applied to x [T, in] (shared) or [T, E, in]
    (per expert): [T, E, out], with a Rank1 patch on ``name.weight`` applied in factored form.

    einsum equivalent: 'TI,EOI->TEO' or 'TEI,EOI->TEO'.
    """
    xp = namespace(x)
    w = p[name + ".weight"]
    xe = x if x.ndim == 2 else xp.permute_dims(x, (1, 0, 2))                 # [T, I] or [E, T, I]
    y = xp.permute_dims(xe @ w.mT, (1, 0, 2))                                # [T, E, O]
    pw = patch.get(name + ".weight") if patch else None
    return y if pw is None else pw.apply(x, y)


@dataclass(frozen=True)
class MoEOuter:
    """m = sum_e w_e (h_e Wd_e^T) [+ shared_gate * (h_s Ws^T)].

    Witness (``method``): 'one' (default) M2 on the down-projection of the token's
    highest-gate expert with delta / w_e; 'all' M2 on every active expert with delta / S,
    S the realised sum of active gates (1 after Mixtral's renormalisation, not for Qwen2-MoE).
    """

    def shapes(self, cfg):
        s = {"experts.down_proj.weight": (cfg.n_experts, cfg.d_model, cfg.d_ff)}
        if cfg.d_ff_shared:
            s.update(linear_shapes("shared.down_proj", cfg.d_model, cfg.d_ff_shared, False))
        return s

    def methods(self, cfg):
        return ("auto", "one", "all")

    def parts(self, p, h, cfg, patch=None):
        m = self.forward(p, h, cfg, patch)
        return m, m

    def forward(self, p, h, cfg, patch=None):
        xp = namespace(h["experts"])
        y = expert_linear(p, "experts.down_proj", h["experts"], patch)        # [T, E, D]
        out = xp.sum(h["gates"][:, :, None] * y, axis=1)
        if "shared" in h:
            out = out + h["shared_gate"] * linear(p, "shared.down_proj", h["shared"], patch)
        return out

    def witness(self, p, h, delta, cfg, method="auto"):
        xp = namespace(delta)
        gates, he = h["gates"], h["experts"]
        if method in ("auto", "one"):
            best = xp.argmax(gates, axis=-1)
            E = gates.shape[-1]
            onehot = best[:, None] == xp.arange(E, device=device(gates))[None, :]
            w = xp.sum(xp.where(onehot, gates, xp.zeros_like(gates)), axis=-1, keepdims=True)
            scale = xp.where(onehot, 1.0 / w, xp.zeros_like(gates))           # [T, E]
            name = "moe-one"
        elif method == "all":
            S = xp.sum(gates, axis=-1, keepdims=True)
            scale = xp.where(gates != 0, xp.broadcast_to(1.0 / S, gates.shape), xp.zeros_like(gates))
            name = "moe-all"
        else:
            raise MethodError(method, cfg.family, self.methods(cfg))
        active = scale != 0
        sq = xp.sum(he * he, axis=-1)                                          # [T, E]
        dead = active & ~(sq > xp.finfo(he.dtype).smallest_normal)
        if bool(xp.any(dead)):
            first_bad(dead, sq, "||h_e||^2 (active expert hidden)", hint="try method='all' or 'one'")
        safe = xp.where(active, sq, xp.ones_like(sq))
        v = xp.where(active[:, :, None], he / safe[:, :, None], xp.zeros_like(he))
        u = scale[:, :, None] * delta[:, None, :]                              # [T, E, D]
        return name, {"experts.down_proj.weight": Rank1(u, v)}
