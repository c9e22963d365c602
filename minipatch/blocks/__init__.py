"""Block families, each a short declaration on the controllability spine (MATH.md M8).

``spec_for(cfg)`` returns the :class:`~minipatch.blocks.base.BlockSpec` of ``cfg.family``.
What gets patched follows from the declaration: M1 on every weight the inner part reads,
and the outer part's witness (M2, a bias, M6a/b/c, or expert down-projections).
"""
from __future__ import annotations

from .base import (KV, AttnValues, BlockSpec, MLPValues, attention_values, attention_values_many, attn_sublayer,
                   block_forward, layer_patch, layer_shapes, mlp_values, own_attention_values,
                   theorem_inputs)
from .families import FAMILY_SPECS, spec_for

__all__ = ["BlockSpec", "KV", "AttnValues", "MLPValues", "attention_values", "attention_values_many",
           "own_attention_values", "attn_sublayer", "mlp_values", "block_forward", "layer_patch", "theorem_inputs",
           "layer_shapes",
           "spec_for", "FAMILY_SPECS"]
