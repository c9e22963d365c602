# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Architecture tour: one spine, every block family
#
# Each family in `minipatch.blocks.families` is a declaration: a layout (sequential,
# post-norm, parallel, no-skip), an input-controllable inner part and an output-controllable
# outer part (MATH.md §5). The M8 witnesses then say *what gets patched*. For each family this
# notebook shows:
#
# 1. the declaration and the parameter names that receive a patch (from `res.patches.layers`),
# 2. exactness of the multi-layer algorithm (M7) in float64 and float32,
# 3. the size of the patches per layer,
#
# and at the end checks the loaders against Hugging Face transformers' own float64 forward on
# the tiny reference checkpoints in `tests/fixtures/`.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minipatch
from minipatch.config import FAMILIES
from minipatch.models import tiny
from minipatch.figures import show
from minipatch.metrics import rel_err




T = 24
CONTEXT = [1, 2, 3, 4, 5, 6, 9, 10, 11, 15]           # not a prefix: kept tokens sit in between
tok = np.random.default_rng(0).integers(0, 256, T)



print("families:", ", ".join(FAMILIES))
assert len(FAMILIES) == 13

# %% [markdown]
# ## What each family declares, and what gets patched
#
# `absorb` returns one layer patch per layer: a dict from the model's internal parameter
# names to `Rank1` (a token-dependent rank-one weight patch, M1/M2), `Shift` (a bias patch,
# M4) or `Scale` (a norm-multiplier patch, M6). The names below are read off layer 0's patch.

# %%
rows = {}
for family in FAMILIES:
    model = tiny(family, seed=1)
    res = minipatch.absorb(model, tok, CONTEXT)
    spec = model.spec
    lp = res.patches.layers[0]
    rows[family] = dict(model=model, res=res)
    kinds = ", ".join(f"{k}:{type(v).__name__}" for k, v in sorted(lp.items()))
    print(f"{family:10s} {spec.layout:10s} inner={type(spec.inner).__name__:15s} outer={type(spec.outer).__name__:16s}"
          f" construction={res.methods[0]:7s} | {kinds}")
    assert lp, family
assert set(rows["vanilla_m3"]["res"].patches.layers[0]) == {"up_proj.weight"}              # M3: W only
assert set(rows["vanilla_m4"]["res"].patches.layers[0]) == {"up_proj.weight", "down_proj.bias"}  # M4
assert "down_proj.weight" in rows["neox"]["res"].patches.layers[0]                          # parallel: outer only
assert "up_proj.weight" not in rows["neox"]["res"].patches.layers[0]
assert "mlp_post_norm.weight" in rows["gemma3"]["res"].patches.layers[0]                    # M6 outer
assert all(rows[f]["res"].methods[0] == "m6d" for f in ("gemma3", "gemma2", "olmo2"))       # auto: M6d first

# %% [markdown]
# Reading the table:
#
# - **Gemma 2/3 and OLMo 2** have a post-norm after the down-projection: the outer witness is
#   one of M6a/b/c/d, so `mlp_post_norm.weight` gets a `Scale` patch (and `W_down` an M2 patch for
#   M6b/M6c/M6d). `method="auto"` tries M6d first, then M6c, M6b, M6a (MATH.md section 3), so the
#   `construction` column above reads `m6d` for these three families. OLMo 2 has no pre-norms at
#   all; its inner part reads `z` directly.
# - **Llama-like, GPT-2 and post-norm** blocks: M1 on the weights that read the (normalized)
#   MLP input, M2 on `W_down`.
# - **Parallel blocks** (GPT-J, GPT-NeoX, PaLM): the MLP input is the layer input `x`, which does
#   not see the context, so no inner patch: M2 on `W_down` with `δ = Attn^C − Attn`.
# - **MoE**: M1 on the router (same logits, so the same top-k and gates) and on the selected
#   experts' gate/up, and M2 on the down-projection of the highest-gate expert with `δ / w_e`.
# - **Vanilla**: M3 patches only `W` (no skip connection, matching the hidden is enough); M4
#   patches `W_1` and shifts the output bias by `z^C − z`.

# %% [markdown]
# ## Exactness: float64 and float32
#
# The patched model runs on the kept tokens only, at their original positions; its logits
# should equal the with-context logits at those positions (M7): ≤ 1e-10 relative in float64,
# ≤ 1e-4 in float32 (MATH.md §8). The last column is the negative control: the same kept-only
# run without patches.

# %%
print(f"{'family':10s} {'float64':>9s} {'float32':>9s} {'no patch':>9s}")
for family, r in rows.items():
    model, res = r["model"], r["res"]
    ref = model.forward(tok)[res.kept]
    r["e64"] = rel_err(minipatch.patched_forward(model, tok, res), ref)
    m32 = model.astype(np.float32)
    r32 = minipatch.absorb(m32, tok, CONTEXT)
    r["e32"] = rel_err(minipatch.patched_forward(m32, tok, r32), ref)
    r["ctrl"] = rel_err(model.forward(tok[res.kept], positions=res.kept), ref)
    print(f"{family:10s} {r['e64']:9.1e} {r['e32']:9.1e} {r['ctrl']:9.2f}")
    assert r["e64"] <= 1e-10 and r["e32"] <= 1e-4 and r["ctrl"] >= 1e-3

# %% [markdown]
# ## Patch sizes per layer
#
# `res.patches.norms()` gives, per layer and per patched parameter, the Frobenius norm of each
# kept token's patch (rank-one patches are never materialized: `‖u v^T‖_F = ‖u‖ ‖v‖`). Below:
# the largest total patch norm over the kept tokens, per layer, relative to the Frobenius norm
# of the weights it patches.

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
for family, r in rows.items():
    model, res = r["model"], r["res"]
    per_layer = []
    for l, norms in enumerate(res.patches.norms()):
        total = np.sqrt(sum(v ** 2 for v in norms.values()))          # [T_K]
        weights = np.sqrt(sum(np.sum(model.params["layers"][l][k] ** 2) for k in norms
                              if k in model.params["layers"][l]))
        per_layer.append(float(total.max() / weights))
    r["norms"] = per_layer
    ax.plot(range(len(per_layer)), per_layer, marker="o", label=family)
    assert all(np.isfinite(per_layer)) and all(v > 0 for v in per_layer)
ax.set_yscale("log")
ax.set_xlabel("layer")
ax.set_ylabel("max over kept tokens of ‖patch‖ / ‖patched weights‖")
ax.set_title("Patch size per layer, every block family (float64, random weights)")
ax.set_xticks(range(4))
ax.legend(fontsize=7, ncol=3)
fig.tight_layout()
show(fig, "05_patch_norms.png")
for family, r in rows.items():
    print(f"{family:10s}", " ".join(f"{v:8.2e}" for v in r["norms"]))

# %% [markdown]
# ## Against Hugging Face transformers
#
# `tests/fixtures/<model_type>/` holds tiny random checkpoints written by transformers 5.23 with
# the reference outputs of a *true* float64 forward (stock HF float64 still runs norms, RoPE and
# softmax in float32; see the README there). For each: the loader's logits and hidden states
# against HF's, the kept-only run (HF's sequence-index sliding window), and the theorem on the
# checkpoint: absorb the context positions and compare with HF's with-context logits.

# %%
FIXTURES = Path("../tests/fixtures")
found = sorted(d for d in FIXTURES.glob("*") if (d / "reference.npz").exists()) if FIXTURES.exists() else []
print(f"{'model_type':10s} {'family':10s} {'logits':>8s} {'hidden':>8s} {'kept':>8s} {'theorem':>8s} {'control':>8s}")
for d in found:
    model = minipatch.load(d)
    ref = np.load(d / "reference.npz")
    tr = {}
    logits = model.forward(ref["input_ids"], trace=tr)
    K = ref["kept_positions"]
    e = dict(logits=rel_err(logits, ref["logits"]), hidden=rel_err(np.stack(tr["hidden_states"]), ref["hidden_states"]),
             kept=rel_err(model.forward(ref["input_ids"][K], positions=K, window_by="index"), ref["logits_kept_only"]))
    res = minipatch.absorb(model, ref["input_ids"], ref["context_positions"])
    e["theorem"] = rel_err(minipatch.patched_forward(model, ref["input_ids"], res), ref["logits"][K])
    e["control"] = rel_err(ref["logits_kept_only"], ref["logits"][K])
    print(f"{d.name:10s} {model.cfg.family:10s} " + " ".join(f"{e[k]:8.1e}" for k in e))
    assert max(e["logits"], e["hidden"], e["kept"]) <= 1e-12 and e["theorem"] <= 1e-10 and e["control"] > 1e-3
print(len(found), "checkpoints checked")
assert len(found) == 0 or len(found) >= 5
