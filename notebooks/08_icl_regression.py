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
# # 08 — In-context linear regression: one gradient step, moved into a weight (M3, M5)
#
# Tokens `z_j = (x_j, y_j)`, query `z_q = (x_q, 0)`. One block (von Oswald et al. 2023; the
# in-context regression setting of Dherin et al. 2025):
#
#     A(C, z_q) = z_q + (1/|C|) sum_j W_PV z_j (z_j^T W_KQ z_q)      (linear self-attention)
#     T(C, z_q) = w_out . act(W A(C, z_q) + b)                        (MLP; M3's W)
#
# With `W_KQ = [[I, 0], [0, 0]]`, `W_PV = eta e_y e_y^T`, `W = e_y^T` the forward pass *is* one
# gradient step from `w = 0` on `L(w) = 1/(2N) sum (w.x_j - y_j)^2`. M3 moves the context into
# `W` (rank-1, M1); M5 describes how that update grows example by example.

# %%

import matplotlib.pyplot as plt
import numpy as np

from minipatch import icl
from minipatch.figures import show
from minipatch.metrics import rel_err




d, N = 8, 64
block = icl.gd_block(d, eta=1.0)
tasks = icl.sample_tasks(256, N, 16, d, seed=0)
pred = icl.predict(block, tasks["x"], tasks["y"], tasks["xq"])
gd = icl.gd_prediction(tasks["x"], tasks["y"], tasks["xq"], eta=1.0)
print(f"forward vs explicit one-step GD prediction: {rel_err(pred, gd):.1e}")
assert rel_err(pred, gd) < 1e-12

# %% [markdown]
# ## 1. M3: the patched block without context predicts what the block with context predicts
# `dW_q = W (A(C, z_q) - z_q) z_q^T / ||z_q||^2`, one rank-1 patch per query. Also for a
# block with random weights and a tanh MLP.

# %%
for name, b in [("analytic GD block", block), ("random tanh block", icl.random_block(d, hidden=32, seed=1))]:
    want = icl.predict(b, tasks["x"], tasks["y"], tasks["xq"])
    patch = icl.implicit_update(b, tasks["x"], tasks["y"], tasks["xq"])
    got = icl.predict_patched(b, patch, tasks["xq"])
    base = icl.readout(b, icl.tokens(tasks["xq"]))
    print(f"{name}: patched vs with-context {rel_err(got, want):.1e}; unpatched (control) {rel_err(base, want):.2f}")
    assert rel_err(got, want) < 1e-12 and rel_err(base, want) > 1e-3

# %% [markdown]
# ## 2. Test loss against the number of in-context examples
# Every prefix in one causal pass (a cumulative sum). One GD step with `eta = 1` from zero;
# baselines: predicting 0, and least squares on the same examples (exact once `N >= d`).

# %%
preds = icl.predict_prefixes(block, tasks["x"], tasks["y"], tasks["xq"])[..., 1:]      # [B, Q, N]
loss = np.mean((preds - tasks["yq"][..., None]) ** 2, axis=(0, 1))
ols = []
for n in range(1, N + 1):
    w_hat = np.stack([np.linalg.lstsq(tasks["x"][k, :n], tasks["y"][k, :n], rcond=None)[0] for k in range(64)])
    ols.append(np.mean((np.einsum("bqd,bd->bq", tasks["xq"][:64], w_hat) - tasks["yq"][:64]) ** 2))
zero = np.mean(tasks["yq"] ** 2)
n_ax = np.arange(1, N + 1)
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.semilogy(n_ax, loss, label="LSA block = one GD step")
ax.semilogy(n_ax, np.maximum(ols, 1e-30), label="least squares (min-norm)")
ax.axhline(zero, color="k", ls=":", label="predict 0")
ax.set_xlabel("in-context examples N"); ax.set_ylabel("test MSE"); ax.legend(fontsize=8)
fig.tight_layout(); show(fig, "08_test_loss.png")
print("test MSE at N = 1, 8, 64:", loss[[0, 7, 63]].round(3), " predict-0:", round(float(zero), 3))
assert loss[-1] < 0.3 * loss[0] and loss[-1] < 0.3 * zero

# %% [markdown]
# ## 3. M5: the implicit update grows by shrinking steps
# For one query, `dW_i` of each prefix; each increment equals `-h grad L_i` with `h = 1/||z_q||^2`
# (checked), and `||dW_i - dW_{i-1}||_F` falls like `1/i` (averaged over 256 tasks).

# %%
incs, errs = [], []
for k in range(256):
    s = icl.implicit_dynamics(block, tasks["x"][k], tasks["y"][k], tasks["xq"][k, 0])
    incs.append(s.increment_norms())
    if k < 8:
        errs += [rel_err(s.gd_step(i), s.increments.dense(i - 1)) for i in range(1, N + 1)]
        p = icl.implicit_update(block, tasks["x"][k, :10], tasks["y"][k, :10], tasks["xq"][k, :1])
        errs.append(rel_err(s.patches.dense(10), p.dense(0)))
inc = np.mean(incs, 0)
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.loglog(n_ax, inc, "o-", ms=3, label=r"$\|dW_i - dW_{i-1}\|_F$")
ax.loglog(n_ax, inc[0] / n_ax, "k--", lw=0.8, label="1/i")
ax.set_xlabel("examples consumed i"); ax.legend(fontsize=8)
fig.tight_layout(); show(fig, "08_increments.png")
slope = np.polyfit(np.log(n_ax[8:]), np.log(inc[8:]), 1)[0]
print(f"max error of M5 identities: {max(errs):.1e}; log-log slope of the increments (i >= 9): {slope:.2f}")
assert max(errs) < 1e-12 and -1.3 < slope < -0.7

# %% [markdown]
# ## 4. Alignment with an explicit gradient step
# The explicit step: fine-tune `W` on the same examples used as context-free queries,
# `-eta grad_W l(W)` with `l(W) = 1/(2N) sum_j (T_W(x_j, 0) - y_j)^2` (gradient derived by hand,
# checked by finite differences). One query's implicit `dW_q` acts on `x_q` exactly as the
# explicit step does, but it is only its projection on `x_q`: the cosine is small. Condensing
# the implicit updates of many queries by least squares (a thought matrix, MATH.md section 6)
# recovers the explicit step: cosine 1 once the queries span `R^d`.

# %%
x, y = tasks["x"][0], tasks["y"][0]
ex = icl.explicit_step(block, x, y)
tb = icl.random_block(d, hidden=6, seed=2)
g = icl.readout_grad(tb, x, y); E = np.zeros_like(g); E[2, 3] = 1e-6
fd = (icl.readout_loss(tb, tb.w + E, x, y) - icl.readout_loss(tb, tb.w - E, x, y)) / 2e-6
print(f"hand-derived gradient vs finite difference (tanh block): {abs(fd - g[2, 3]) / np.max(np.abs(g)):.1e}")
assert abs(fd - g[2, 3]) / np.max(np.abs(g)) < 1e-7
xq = np.random.default_rng(1).standard_normal((32, d))
single = [icl.cosine(icl.implicit_update(block, x, y, xq[q:q + 1]).dense(0), ex) for q in range(32)]
counts = np.arange(1, 17)
cond = [icl.cosine(icl.condensed_update(block, x, y, xq[:c])[0], ex) for c in counts]
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.plot(counts, cond, "o-", label="least-squares condensation over queries")
ax.axhline(np.mean(np.abs(single)), color="gray", ls="--", label="one query, mean |cos|")
ax.axvline(d, color="k", ls=":", lw=0.8)
ax.set_xlabel("queries condensed"); ax.set_ylabel("cosine with explicit GD step"); ax.legend(fontsize=8)
fig.tight_layout(); show(fig, "08_alignment.png")
print("one query: mean |cos| =", round(float(np.mean(np.abs(single))), 3), "; condensed, 1..16 queries:", np.round(cond, 3))
assert np.mean(np.abs(single)) < 0.7 and abs(cond[d - 1] - 1) < 1e-12
rb = icl.random_block(d, hidden=32, seed=1)
cos_r = icl.cosine(icl.condensed_update(rb, x, y, xq)[0], icl.explicit_step(rb, x, y))
print(f"random tanh block (no GD structure): condensed implicit vs explicit cosine = {cos_r:.3f}")

# %% [markdown]
# **Summary.** The analytic LSA block's forward is one GD step; its context is exactly a rank-1
# update of the readout weight (M3, error ~1e-16); the update is built by rank-1 gradient steps
# of size ~1/i (M5); and the least-squares condensation of the per-query updates equals the
# explicit fine-tuning step. For a block without GD structure (random weights) the exact M3/M5
# identities still hold, but the condensed update need not align with explicit fine-tuning.
