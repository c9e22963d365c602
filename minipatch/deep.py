"""MLPs of any depth on the controllability spine (MATH.md M8, "MLPs of any depth").

An MLP of depth k >= 2 (``cfg.mlp_depth``), each layer ``act(. W_j^T + b_j)`` but the last:

    h_1 = act(n W_1^T + b_1)                       inner part: the only layer that reads n
    h_j = act(h_(j-1) W_j^T + b_j), j = 2..k-1     outer part: fixed functions of h_1 ...
    m   = h_(k-1) W_k^T + b_k                      ... then the last linear layer

Only the first layer reads the (normalized) MLP input, so M1 on W_1 makes h_1 = f(z^C) from z
(input controllability, as for depth 2). The rest maps h_1 to m through unpatched layers, so
its output controllability is that of its last layer at its own input h_(k-1): M2 on W_k
(needs h_(k-1) != 0) or ``b_k += delta``. Depth 2 is the usual MLP: the families keep their
own declarations there.

Parameter names: ``up_proj`` (W_1, the inner part's), ``mid_proj.{j}`` for the middle layers
(j = 0..k-3) and ``down_proj`` (W_k).
"""
from __future__ import annotations

from dataclasses import dataclass

from .controllability import LinearOuter, bias_witness, linear_shapes
from .ops import activation
from .patches import linear


@dataclass(frozen=True)
class DeepOuter(LinearOuter):
    """The rest of a depth-k MLP: middle layers with activation, then the last linear layer.

    Attributes:
      depth: k, the MLP's number of linear layers (>= 2; the inner part is layer 1).
      act: the middle layers' activation (the inner part's).
      prefer_bias: ``method='auto'`` uses ``b_k += delta`` (vanilla M4) instead of M2.
    """

    depth: int = 3
    act: str = "relu"
    prefer_bias: bool = False
    mid: str = "mid_proj"

    def shapes(self, cfg):
        s = {}
        for j in range(self.depth - 2):
            s.update(linear_shapes(f"{self.mid}.{j}", cfg.d_ff, cfg.d_ff, cfg.mlp_bias or self.bias))
        return {**s, **super().shapes(cfg)}

    def methods(self, cfg):
        return ("auto", "bias", "m2") if self.prefer_bias else super().methods(cfg)

    def last_input(self, p, h, cfg, patch=None):
        """h_(k-1): the input of the last layer, from h = h_1 through the middle layers."""
        for j in range(self.depth - 2):
            h = activation(self.act)(linear(p, f"{self.mid}.{j}", h, patch))
        return h

    def forward(self, p, h, cfg, patch=None):
        return linear(p, self.down, self.last_input(p, h, cfg, patch), patch)

    def parts(self, p, h, cfg, patch=None):
        m = self.forward(p, h, cfg, patch)
        return m, m

    def witness(self, p, h, delta, cfg, method="auto"):
        """M2 on W_k at h_(k-1) (or the bias shift): output controllability of the last layer."""
        if self.prefer_bias and method in ("auto", "bias"):
            return "bias", {self.down + ".bias": bias_witness(delta)}
        return super().witness(p, self.last_input(p, h, cfg), delta, cfg, method)


def deep_outer(cfg, prefer_bias=False):
    """The outer part for ``cfg.mlp_depth`` (None at depth 2: the family's own declaration)."""
    if cfg.mlp_depth == 2:
        return None
    return DeepOuter(bias=prefer_bias, depth=cfg.mlp_depth, act=cfg.act, prefer_bias=prefer_bias)
