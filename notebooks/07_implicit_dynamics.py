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
# # 07 — Learning without training: the implicit dynamics of a prompt (MATH.md M5)
#
# Dherin et al. 2025 (arXiv 2507.16003): for a contextual block `T(C, x) = f(W A(C, x) + b)`
# the context can be moved into the first MLP weight, `dW = (W dA) A_0^T / ||A_0||^2` (M3, M1).
# Feeding the context one token at a time, `A_i = A(c_1..c_i, x)`, the patches of the growing
# prefixes obey (M5)
#
#     dW_i - dW_{i-1} = h W (A_i - A_{i-1}) A_0^T = -h grad_W L_i(W),
#     h = 1/||A_0||^2,  L_i(W) = trace(D_i^T W),  D_i = W (A_{i-1} - A_i) A_0^T  (fixed).
#
# `minipatch.dynamics` computes every `A_i` in one attention pass (the query attends to a
# prefix mask), checks it against a loop over prefixes, and then extends the reading to
# multi-layer models, where it only partly holds.

# %%

import matplotlib.pyplot as plt
import numpy as np

from minipatch import lemmas
from minipatch.blocks import attn_sublayer
from minipatch.dynamics import first_block_dynamics
from minipatch.dynamics_model import model_dynamics
from minipatch.models import tiny, tiny_gemma
from minipatch.figures import show
from minipatch.metrics import rel_err




rng = np.random.default_rng(0)
vanilla = tiny("vanilla_m3", seed=0, n_layers=1)
n = 32
tokens = rng.integers(0, 256, n + 1)         # c_1..c_32, then the query x
bd = first_block_dynamics(vanilla, tokens)    # one pass, query right after each prefix
steps = bd.steps["up_proj.weight"]            # the vanilla block's W (M3)
print(vanilla, "steps:", steps.n_steps)

# %% [markdown]
# ## 1. The iterates are the M1 patches of the growing prefixes
# Independently: run the attention sublayer on each prefix `c_1..c_i, x` (a loop), take the
# query's output `A_i` and apply `lemmas.m1`.

# %%
x = vanilla.embed(tokens, np.arange(n + 1))
p = vanilla.params["layers"][0]
A = []
for i in range(n + 1):
    z, _ = attn_sublayer(vanilla.spec, p, np.concatenate([x[:i], x[n:]]), vanilla.cfg, 0, np.r_[np.arange(i), i])
    A.append(z[-1])
A = np.stack(A)
err_a = rel_err(bd.a, A)
err_dw = max(rel_err(steps.patches.dense(i), lemmas.m1(p["up_proj.weight"], A[:1], A[i:i + 1]).dense(0)) for i in range(1, n + 1))
print(f"A_i one pass vs loop: {err_a:.1e}; dW_i vs M1 of each prefix: {err_dw:.1e}")
assert err_a < 1e-12 and err_dw < 1e-12

# %% [markdown]
# ## 2. Each increment is one gradient step of a linear loss
# `-h * D_i` (the analytic gradient of `L_i` times the learning rate `h = 1/||A_0||^2`) against
# the increment; the gradient of `L_i` by central finite differences as well.

# %%
err_gd = max(rel_err(steps.gd_step(i), steps.increments.dense(i - 1)) for i in range(1, n + 1))
w0 = rng.standard_normal(steps.w.shape)
E = np.zeros_like(w0); E[3, 5] = 1e-3
fd = (steps.loss(4, w0 + E) - steps.loss(4, w0 - E)) / 2e-3
err_fd = abs(-steps.lr * fd - steps.increments.dense(3)[3, 5]) / np.max(np.abs(steps.increments.dense(3)))
ranks = {int(np.linalg.matrix_rank(steps.increments.dense(i))) for i in range(n)}
print(f"increment vs -h grad L_i: {err_gd:.1e}; finite difference entry: {err_fd:.1e}; ranks {ranks}; h = {float(steps.lr):.3f}")
assert err_gd < 1e-12 and err_fd < 1e-9 and ranks == {1}

# %% [markdown]
# ## 3. Do the steps shrink as the context grows?
# Averaged over 32 random prompts, for the vanilla block and for the first block of a small
# Gemma-3 model (M1 on `gate_proj`, A = the normalized MLP input). M5's picture, "attention to
# each new token dilutes", holds when attention scores are nearly flat: the vanilla block's
# scores are small, and its steps fall like 1/i. The Gemma block normalizes q and k
# (scores of order 1 to 3) and re-normalizes the attention output (`attn_post_norm`): a new
# token can still take a large share, and on these random weights the steps do not shrink
# over 32 tokens. Measured, not assumed.

# %%
gemma = tiny_gemma(seed=0, n_layers=1)
def curves(model, name, reps=32):
    inc, tot = [], []
    for r in range(reps):
        s = first_block_dynamics(model, np.random.default_rng(100 + r).integers(0, 256, n + 1)).steps[name]
        inc.append(s.increment_norms()); tot.append(s.patch_norms())
    return np.mean(inc, 0), np.mean(tot, 0)
v_inc, v_tot = curves(vanilla, "up_proj.weight")
g_inc, g_tot = curves(gemma, "gate_proj.weight")
i = np.arange(1, n + 1)
fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
for a_, (inc, tot, lab) in zip(ax, [(v_inc, v_tot, "vanilla M3 block (W = up_proj)"), (g_inc, g_tot, "Gemma-3 block 0 (W = gate_proj)")]):
    a_.loglog(i, inc, "o-", ms=3, label=r"$\|dW_i - dW_{i-1}\|_F$")
    a_.loglog(np.arange(n + 1)[1:], tot[1:], "s-", ms=3, label=r"$\|dW_i\|_F$")
    a_.loglog(i, inc[0] / i, "k--", lw=0.8, label="1/i")
    a_.set_xlabel("context tokens consumed i"); a_.set_title(lab, fontsize=10); a_.legend(fontsize=8)
fig.tight_layout(); show(fig, "07_increment_decay.png")
print("vanilla increments first/last 8:", v_inc[:8].mean().round(3), v_inc[-8:].mean().round(3))
print("gemma   increments first/last 8:", g_inc[:8].mean().round(3), g_inc[-8:].mean().round(3))
assert v_inc[-8:].mean() < 0.3 * v_inc[:8].mean()          # vanilla: strong decay
assert 0.5 < g_inc[-8:].mean() / g_inc[:8].mean() < 2.0      # Gemma block (random weights): no decay

# %% [markdown]
# ## 4. Multi-layer models: a gradient step per layer, plus drift
# For each prefix `i`, `minipatch.absorb` (M7) patches every layer. At layer `l` the M1 patch is
# `dW_i = h_i W (a_i - o_i) o_i^T` with `o_i` the layer's context-free input and `a_i` its input
# with the prefix. The increment splits into `grad = h_i W (a_i - a_{i-1}) o_i^T` (a gradient
# step of the linear loss built on the layer's *current* `A_0 = o_i`) and a `drift` that is zero
# iff `o_i = o_{i-1}`. At layer 0, `o_i` does not move (RoPE: the kept-only run is
# shift-invariant), so it is exactly M5. Deeper, `o_i` is computed from the with-prefix stream
# and moves with every token: the sequence is *not* one online gradient descent on fixed data.

# %%
deep = tiny_gemma(seed=1, n_layers=4, sliding_window=64)
tok = rng.integers(0, 256, n + 1)
md = model_dynamics(deep, tok, n)
frac = np.array([np.mean(md.drift[l]["gate_proj.weight"][:, 0] / md.increments[l]["gate_proj.weight"][:, 0]) for l in range(4)])
for l in range(4):
    print(f"layer {l}: mean ||drift|| / ||increment|| = {frac[l]:.2e}")
assert frac[0] < 1e-12 and np.all(frac[1:] > 1e-2)
fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
for l in range(4):
    ax[0].semilogy(i, md.increments[l]["gate_proj.weight"][:, 0], label=f"layer {l}")
    ax[1].semilogy(i, md.drift[l]["gate_proj.weight"][:, 0] + 1e-18, label=f"layer {l}")
ax[0].set_title("||dW_i - dW_{i-1}||_F (gate_proj)", fontsize=10); ax[1].set_title("drift part (0 = pure GD step)", fontsize=10)
for a_ in ax:
    a_.set_xlabel("context tokens consumed i"); a_.legend(fontsize=8)
fig.tight_layout(); show(fig, "07_layers.png")

# %% [markdown]
# **Summary.** For one block whose input does not depend on the context (a vanilla M3 block,
# or layer 0 of any model), consuming a prompt is a sequence of rank-1 online gradient steps
# on the MLP weight, with fixed learning rate `1/||A_0||^2`; the step sizes shrink where
# attention dilutes (vanilla block) and need not otherwise (figure 07_increment_decay). In deeper layers each per-layer increment is a
# gradient step plus a drift of the same order (figure 07_layers).
