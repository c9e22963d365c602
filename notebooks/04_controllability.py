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
# # 04 · Controllability: why every block family has an exact patch (MATH.md §5, M8)
#
# Write an MLP sublayer as `out = z + g(f(z))`: `f` is the **inner** part (pre-norm, up/gate
# projections, activation, router), `g` the **outer** part (down-projections, expert mixing,
# post-norm). MATH.md §5 defines two properties:
#
# - `f_θ` is **input-controllable** if for every `z ≠ 0` and every `z'` there are parameters `θ'`
#   with `f_θ'(z) = f_θ(z')`;
# - `g_φ` is **output-controllable** if for every `h` (e.g. `h ≠ 0`) and every `δ` there are
#   parameters `φ'` with `g_φ'(h) = g_φ(h) + δ`.
#
# **M8.** If both hold, `z + g_φ'(f_θ'(z)) = z^C + g_φ(f_θ(z^C))`, with `θ'` from `(z, z^C)` and `φ'`
# from `(f(z^C), z^C − z)`. Every block family in `minipatch.blocks.families` is nothing but a
# declaration of one inner and one outer part. This notebook turns the two definitions into
# executable checks, computes MATH.md's witness table live, and composes the witnesses (M8).

# %%

import matplotlib.pyplot as plt
import numpy as np

import minipatch
from minipatch import NotControllableError
from minipatch.controllability import (GatedInner, IdentityActInner, max_abs_diff, check_input_controllable,
                                       check_output_controllable, m8)
from minipatch.models import tiny
from minipatch.figures import show




rng = np.random.default_rng(0)
T, D = 6, 64


def layer(family, **kw):
    """Layer 1 of a small random model of ``family``: (params, config, block declaration)."""
    m = tiny(family, seed=11, **kw)
    return m.params["layers"][1], m.cfg, m.spec


def size(x):
    if isinstance(x, dict):
        return max(float(np.abs(x["gates"]).max()), float(np.abs(x["experts"]).max()))
    return float(np.abs(x).max())


print("minipatch", minipatch.__version__)

# %% [markdown]
# ## The two definitions, executable
#
# `check_input_controllable(inner, p, cfg, z, z_target)` builds the inner witness (M1 on every
# weight that reads the normalized input, with the shared `v = n/‖n‖²`) and returns
# `max |f'(z) − f(z_target)|`. `check_output_controllable(outer, p, cfg, h, δ, method)` builds
# the outer witness and returns `max |g'(h) − (g(h) + δ)|`. Both should be rounding error.
# First on a Llama block: RMSNorm → SwiGLU inside, `W_down` outside.

# %%
p, cfg, spec = layer("llama")
print("declaration:", spec.layout, "|", spec.inner, "|", spec.outer)
z, z_target = rng.standard_normal((T, D)), 3 * rng.standard_normal((T, D))
err_in, patch_in = check_input_controllable(spec.inner, p, cfg, z, z_target)
gap_in = float(np.abs(spec.inner.forward(p, z, cfg) - spec.inner.forward(p, z_target, cfg)).max())
h = spec.inner.forward(p, z, cfg)
delta = rng.standard_normal((T, D))
err_out, patch_out = check_output_controllable(spec.outer, p, cfg, h, delta, "m2")
print(f"input-controllable:  max|f'(z) - f(z')|      = {err_in:.1e}   (unpatched gap {gap_in:.2f})")
print(f"output-controllable: max|g'(h) - g(h) - d|  = {err_out:.1e}   (|d| up to {np.abs(delta).max():.2f})")
print("inner witness patches", sorted(patch_in), "; outer witness patches", sorted(patch_out))
assert err_in <= 1e-12 * size(spec.inner.forward(p, z_target, cfg)) and gap_in > 1e-2
assert err_out <= 1e-12 * np.abs(delta).max()
assert sorted(patch_in) == ["gate_proj.weight", "up_proj.weight"] and list(patch_out) == ["down_proj.weight"]

# %% [markdown]
# ## The witness table, computed
#
# Each row of MATH.md §5's table, with the parameters of a small random model of a family
# that has that part. Inner rows report `max |f'(z) − f(z')|`, outer rows
# `max |g'(h) − (g(h) + δ)|`, both relative to the size of the target, next to the unpatched
# gap (the negative control; for outer rows it is `|δ|` itself, the change the witness must make).

# %%
INNER = [
    ("linear z W^T + b", "vanilla_m4", lambda s: IdentityActInner(None, act="relu")),
    ("pre-norm (LayerNorm) then linear, GELU", "gpt2", lambda s: s.inner),
    ("pre-norm RMSNorm(1+g) then GeGLU", "gemma3", lambda s: s.inner),
    ("pre-norm RMSNorm then SwiGLU", "llama", lambda s: s.inner),
    ("pre-norm RMSNorm then ReGLU", "llama", lambda s: GatedInner("mlp_norm", act="relu")),
    ("MoE inner: router + experts", "mixtral", lambda s: s.inner),
    ("MoE inner + shared expert", "qwen2_moe", lambda s: s.inner),
]
OUTER = [
    ("linear outer h W^T: M2", "llama", "m2"),
    ("linear outer with bias: b += delta", "gpt2", "bias"),
    ("post-norm RMSNorm outer: M6a", "gemma3", "m6a"),
    ("post-norm RMSNorm outer: M6b", "gemma3", "m6b"),
    ("post-norm RMSNorm outer: M6c", "gemma3", "m6c"),
    ("post-norm RMSNorm outer: M6d", "gemma3", "m6d"),
    ("MoE outer: one expert, delta / w_e", "qwen2_moe", "one"),
    ("MoE outer: every active expert, delta / S", "qwen2_moe", "all"),
]
table = []
for name, family, make in INNER:
    p, cfg, spec = layer(family)
    inner = make(spec)
    z, zt = rng.standard_normal((T, D)), 3 * rng.standard_normal((T, D))
    target = inner.forward(p, zt, cfg)
    err, patch = check_input_controllable(inner, p, cfg, z, zt)
    table.append(("inner", name, family, ", ".join(sorted(patch)), err / size(target),
                  max_abs_diff(inner.forward(p, z, cfg), target) / size(target)))
for name, family, method in OUTER:
    p, cfg, spec = layer(family)
    h = spec.inner.forward(p, rng.standard_normal((T, D)), cfg)
    delta = rng.standard_normal((T, D))
    err, patch = check_output_controllable(spec.outer, p, cfg, h, delta, method)
    gap = max_abs_diff(spec.outer.forward(p, h, cfg), spec.outer.forward(p, h, cfg) + delta)
    table.append(("outer", name, family, ", ".join(sorted(patch)), err / np.abs(delta).max(), gap / np.abs(delta).max()))
print(f"{'part':5s}  {'witness':44s} {'family':10s} {'rel. error':>10s} {'unpatched':>9s}  patched parameters")
for kind, name, family, names, err, gap in table:
    print(f"{kind:5s}  {name:44s} {family:10s} {err:10.1e} {gap:9.2f}  {names}")
assert all(row[4] <= 1e-12 for row in table)
assert all(row[5] >= 1e-2 for row in table)

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
errs = [max(row[4], 1e-18) for row in table]
ax.barh(range(len(table)), errs, color=["tab:blue" if r[0] == "inner" else "tab:orange" for r in table])
ax.set_yticks(range(len(table)), [f"{r[1]} ({r[2]})" for r in table], fontsize=7)
ax.set_xscale("log")
ax.axvline(1e-12, color="k", ls="--", lw=1, label="1e-12 bar")
ax.set_xlabel("relative error of the witness (blue: inner, orange: outer)")
ax.set_title("MATH.md §5 witness table, measured in float64")
ax.legend()
fig.tight_layout()
show(fig, "04_witness_errors.png")

# %% [markdown]
# ## MoE: measure the realised gate sum `S`
#
# The MoE outer part is `Σ_e w_e E_e(h_e)`. M2 on *one* selected expert's down-projection with
# `δ / w_e` is a witness; so is M2 on *every* active expert with `δ / S`, where `S` is the sum
# of the active gates **as realised**. Mixtral renormalises its top-k gates (`S = 1`);
# Qwen2-MoE (`norm_topk_prob = False`) does not, so `S < 1`, and a witness that assumed
# `S = 1` would add `S δ` instead of `δ`.

# %%
S = {}
for family in ("mixtral", "qwen2_moe"):
    p, cfg, spec = layer(family)
    h = spec.inner.forward(p, rng.standard_normal((200, D)), cfg)
    S[family] = h["gates"].sum(-1)
    print(f"{family:10s} top_k={cfg.top_k} of {cfg.n_experts}: S in [{S[family].min():.4f}, {S[family].max():.4f}]")
assert np.allclose(S["mixtral"], 1.0, atol=1e-15)
assert np.all(S["qwen2_moe"] < 1 - 1e-3)

p, cfg, spec = layer("qwen2_moe")
h = spec.inner.forward(p, rng.standard_normal((T, D)), cfg)
delta = rng.standard_normal((T, D))
_, patch = spec.outer.witness(p, h, delta, cfg, "all")
r = patch["experts.down_proj.weight"]
naive = minipatch.Rank1(r.u * h["gates"].sum(-1)[:, None, None], r.v)   # delta, not delta / S
off = spec.outer.forward(p, h, cfg, {"experts.down_proj.weight": naive}) - spec.outer.forward(p, h, cfg) - delta
err_all, _ = check_output_controllable(spec.outer, p, cfg, h, delta, "all")
print(f"'all' with delta/S: error {err_all:.1e};  assuming S = 1: error {np.abs(off).max():.2f}")
assert err_all <= 1e-12 * np.abs(delta).max() and np.abs(off).max() > 1e-2

fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(S["qwen2_moe"], bins=30, label="Qwen2-MoE (no renormalisation)")
ax.axvline(1.0, color="tab:red", label="Mixtral: S = 1")
ax.set_xlabel("realised gate sum S per token")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig, "04_gate_sum.png")

# %% [markdown]
# ## M8: compose the two witnesses
#
# For arbitrary `z` and `z^C` (they need not come from attention), the inner witness is built
# from `(z, z^C)` and the outer witness from `(f(z^C), z^C − z)`. The patched sublayer on `z`
# then equals the unpatched sublayer on `z^C`, for every family whose MLP reads `z`.

# %%
for family in ("gemma3", "llama", "gpt2", "olmo2", "postnorm", "mixtral", "qwen2_moe", "vanilla_m4"):
    p, cfg, spec = layer(family)
    z, z_ctx = rng.standard_normal((T, D)), rng.standard_normal((T, D))
    h_ctx = spec.inner.forward(p, z_ctx, cfg)
    name, patch = m8(spec.inner, spec.outer, p, cfg, z, z_ctx, h_ctx, z_ctx - z)
    got = z + spec.outer.forward(p, spec.inner.forward(p, z, cfg, patch), cfg, patch)
    want = z_ctx + spec.outer.forward(p, h_ctx, cfg)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{family:10s} outer witness {name:8s} rel. error {err:.1e}  patches {sorted(patch)}")
    assert err <= 1e-12

# %% [markdown]
# ## When a witness does not exist (MATH.md §7)
#
# M2 divides by `‖h‖²`. A ReLU hidden that is all zero has no M2 witness; where the outer part
# has a bias, `b += δ` is a witness without conditions and `method="auto"` uses it. Without a
# bias the package raises `NotControllableError` naming the layer, the token position and the
# quantity.

# %%
base = tiny("gpt2", seed=1, act="relu")
layers = [dict(lp) for lp in base.params["layers"]]
layers[1]["up_proj.bias"] = np.full_like(layers[1]["up_proj.bias"], -1e3)     # every hidden unit dead
dead = minipatch.Model(base.cfg, dict(base.params, layers=layers))
tok = rng.integers(0, 256, 12)
res = minipatch.absorb(dead, tok, [0, 1, 2, 5])
err = np.abs(minipatch.patched_forward(dead, tok, res) - dead.forward(tok)[res.kept]).max()
print("methods per layer:", res.methods, f" theorem error {err:.1e}")
try:
    minipatch.absorb(dead, tok, [0, 1, 2, 5], method="m2")
    raise AssertionError("expected NotControllableError")
except NotControllableError as e:
    print(f"method='m2': NotControllableError at layer {e.layer}, token position {e.position}: "
          f"{e.quantity} = {e.value}")
    assert e.layer == 1 and e.position == 3
assert res.methods[1] == "bias" and err <= 1e-10 * np.abs(dead.forward(tok)).max()
