"""The sublayers an audit compares, in forward order, and where two runs first diverge.

One list for every family (FORMATS.md), each entry an output the forward computes, read from
:meth:`minipatch.model.Model.run`'s trace (the norms recomputed from the traced input by the
same function, so bit for bit what the forward used). A family without a part has no entry.

| name | what | minipatch | Hugging Face (Llama / Gemma) |
|---|---|---|---|
| attn_norm | the attention's input norm | norm(attn_norm, x) | input_layernorm out |
| attn_out | the attention output (o_proj) | trace o | self_attn out |
| attn_post_norm | the post-attention norm | trace a | post_attention_layernorm out (Gemma, OLMo 2) |
| mlp_in | the MLP sublayer's input (residual stream after attention; parallel: x) | trace z | pre-MLP norm in |
| mlp_norm | the MLP's pre-norm | inner.normalize(z) | post_attention_layernorm / pre_feedforward_layernorm out |
| mlp_hidden | the hidden, input of the down projection (not for MoE) | trace h | mlp.down_proj in |
| mlp_out | the down projection (MoE: the mixture) | trace d | mlp out |
| mlp_post_norm | the post-MLP norm (Gemma, OLMo 2) | trace m | post_feedforward_layernorm out |
| out | the block output (before the final norm) | trace out | decoder layer out |
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..patches import norm
from ..metrics import rel_err

SUBLAYERS = ("attn_norm", "attn_out", "attn_post_norm", "mlp_in", "mlp_norm", "mlp_hidden", "mlp_out",
             "mlp_post_norm", "out")
"""Every sublayer name, in forward order (FORMATS.md)."""

WHAT = {"attn_norm": "the attention's input norm", "attn_out": "the attention output (o_proj)",
        "attn_post_norm": "the post-attention norm", "mlp_in": "the MLP's input (stream after attention)",
        "mlp_norm": "the MLP's pre-norm", "mlp_hidden": "the MLP hidden (down-projection input)",
        "mlp_out": "the MLP output (down projection)", "mlp_post_norm": "the post-MLP norm",
        "out": "the block output"}




def layer_sublayers(model, layer, row):
    """{name: array [T, W]} of one layer's sublayers, from its trace row (see module doc)."""
    spec, cfg, lp = model.spec, model.cfg, model.params["layers"][layer]
    out = {}
    if spec.attn_pre_norm:
        out["attn_norm"] = norm(lp, "attn_norm", row["x"], cfg)
    out["attn_out"] = row["o"]
    if spec.attn_post_norm:
        out["attn_post_norm"] = row["a"]
    out["mlp_in"] = row["z"]
    if spec.inner.pre_norm:
        out["mlp_norm"] = spec.inner.normalize(lp, row["z"], cfg)
    if not isinstance(row["h"], dict):
        out["mlp_hidden"] = row["h"]
    out["mlp_out"] = row["d"]
    if row["m"] is not row["d"]:
        out["mlp_post_norm"] = row["m"]
    out["out"] = row["out"]
    return out


def model_sublayers(model, trace):
    """{name: numpy [L, T, W]} of every sublayer this family has, from a :meth:`Model.run` trace."""
    rows = [layer_sublayers(model, l, row) for l, row in enumerate(trace["layers"])]
    if not rows:
        return {}
    return {k: np.stack([to_numpy(r[k]) for r in rows]) for k in SUBLAYERS if k in rows[0]}


def scan(ours, ref, rtol, start=None):
    """Walk every layer's sublayers in forward order and find the first beyond ``rtol``.

    Args:
      ours, ref: {name: [L, T, W]} (only the names both hold are compared).
      start: (label, error) of what comes before layer 0 (e.g. the embeddings), or None.
    Returns:
      (table {name: [error per layer]}, first {'layer', 'sublayer', 'rel_err'} or None,
      before: the same for the entry just before the first, or None).
    """
    names = [k for k in SUBLAYERS if k in ours and k in ref]
    table = {k: [] for k in names}
    prev = None if start is None else {"layer": None, "sublayer": start[0], "rel_err": start[1]}
    first = before = None
    n = min((ours[k].shape[0] for k in names), default=0)
    for l in range(n):
        for k in names:
            e = rel_err(ours[k][l], ref[k][l])
            table[k].append(e)
            here = {"layer": l, "sublayer": k, "rel_err": e}
            if first is None and not e <= rtol:
                first, before = here, prev
            prev = here
    return table, first, before


def describe(entry):
    """'layer 3 mlp_post_norm (the post-MLP norm)' for a scan entry."""
    if entry is None:
        return "none"
    if entry["layer"] is None:
        return entry["sublayer"]
    return f"layer {entry['layer']} {entry['sublayer']} ({WHAT[entry['sublayer']]})"
