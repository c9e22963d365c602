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
# # 01 · The two rank-one lemmas (MATH.md M1, M2)
#
# Everything minipatch does is built from two facts about a single matrix.
#
# **M1 (input absorption).** For a weight `W` (out × in), an input `a ≠ 0` and any other input `a'`,
#
# $$\Delta W = \frac{W(a' - a)\,a^\top}{\lVert a\rVert^2} \quad\text{gives}\quad (W + \Delta W)\,a = W a'.$$
#
# **M2 (output absorption).** For `W`, an input `h ≠ 0` and any change `δ` of the output,
#
# $$\Delta W = \frac{\delta\, h^\top}{\lVert h\rVert^2} \quad\text{gives}\quad (W + \Delta W)\,h = W h + \delta.$$
#
# Below, each claim of MATH.md §1 is checked numerically, one cell per claim, and each
# cell ends in an `assert`: rank one, the minimum-norm property (`residual @ pinv(a)`),
# non-uniqueness, the factored application cost, and what happens when `a = 0`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minipatch
from minipatch import NotControllableError, Rank1
from minipatch.lemmas import m1, m2, pinv_form
from minipatch.figures import show




rng = np.random.default_rng(0)
print("minipatch", minipatch.__version__)

# %% [markdown]
# ## M1 on one token
#
# `m1(W, a, a_ctx)` is vectorized over tokens: it takes `a`, `a'` as `[T, in]` arrays and
# returns a `Rank1` patch with `u [T, out]`, `v [T, in]`, so that token `t`'s patch is
# `ΔW_t = u_t v_tᵀ` with `u = W(a' − a)` and `v = a / ‖a‖²`. Here `T = 1`.

# %%
out_dim, in_dim = 6, 5
W = rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)
a = rng.standard_normal(in_dim)          # the input without context
a_ctx = rng.standard_normal(in_dim)      # the input with context, a'

patch = m1(W, a[None], a_ctx[None])
dW = patch.dense(0)                      # [out, in], materialized only for inspection
print("u =", np.round(patch.u[0], 3))
print("v =", np.round(patch.v[0], 3))
assert isinstance(patch, Rank1) and patch.u.shape == (1, out_dim) and patch.v.shape == (1, in_dim)
assert np.allclose(dW, np.outer(W @ (a_ctx - a), a) / (a @ a), rtol=0, atol=1e-15)

# %% [markdown]
# **The identity.** The patched weight sends the *old* input to the *new* output:
# `(W + ΔW) a = W a'`. The old output `W a` is gone: the patch absorbed the change of input.

# %%
lhs = (W + dW) @ a
rhs = W @ a_ctx
print("(W + dW) a =", np.round(lhs, 6))
print("W a'       =", np.round(rhs, 6))
print("max |difference| =", np.max(np.abs(lhs - rhs)))
assert np.max(np.abs(lhs - rhs)) <= 1e-14 * np.max(np.abs(rhs))
assert np.max(np.abs(W @ a - rhs)) > 0.1    # without the patch the output is far off

# %% [markdown]
# **Rank one.** `ΔW = u vᵀ` is an outer product, so its dense form has matrix rank 1:
# one singular value carries everything, the others are rounding noise.

# %%
sv = np.linalg.svd(dW, compute_uv=False)
print("singular values of dW:", sv)
assert np.linalg.matrix_rank(dW) == 1
assert sv[1] <= 1e-14 * sv[0]

# %% [markdown]
# ## M1 is the minimum-Frobenius-norm solution
#
# The constraint `ΔW a = r` with residual `r = W(a' − a)` is linear in `ΔW`. Its
# minimum-norm solution is `r a⁺`, where `a⁺ = aᵀ/‖a‖²` is the Moore–Penrose
# pseudo-inverse of the column `a`. `lemmas.pinv_form` computes it with `np.linalg.pinv`,
# independently of `m1`.

# %%
dW_pinv = pinv_form(W, a, a_ctx)
print("max |m1 - residual @ pinv(a)| =", np.max(np.abs(dW - dW_pinv)))
assert np.allclose(dW, dW_pinv, rtol=0, atol=1e-14)

# %% [markdown]
# A second, fully independent check: write `ΔW a = r` as an ordinary linear system in the
# `out·in` unknowns of `vec(ΔW)` (the matrix `I ⊗ aᵀ`) and ask LAPACK's least-squares solver,
# which returns the minimum-norm solution of an underdetermined system.

# %%
A_sys = np.kron(np.eye(out_dim), a[None, :])        # [out, out*in]: (I ⊗ a^T) vec(dW) = r
r = W @ (a_ctx - a)
vec, *_ = np.linalg.lstsq(A_sys, r, rcond=None)
dW_lstsq = vec.reshape(out_dim, in_dim)
print("max |m1 - lstsq| =", np.max(np.abs(dW - dW_lstsq)))
assert np.allclose(dW, dW_lstsq, rtol=0, atol=1e-14)

# %% [markdown]
# ## Non-uniqueness
#
# Any `ΔW'` with `ΔW' a = 0` can be added: `ΔW + ΔW'` still solves the constraint. Such a
# `ΔW'` is any matrix whose rows are orthogonal to `a`, e.g. `M (I − a aᵀ/‖a‖²)`. Since the
# rows of `ΔW` are parallel to `a`, the two are orthogonal in the Frobenius inner product and
#
# $$\lVert \Delta W + \Delta W'\rVert_F^2 = \lVert \Delta W\rVert_F^2 + \lVert \Delta W'\rVert_F^2 \ \ge\ \lVert\Delta W\rVert_F^2 .$$
#
# We draw 2,000 random solutions this way and check all three facts.

# %%
P_perp = np.eye(in_dim) - np.outer(a, a) / (a @ a)   # projector onto the complement of a
n_draws = 2000
scales = np.exp(rng.uniform(np.log(1e-3), np.log(3.0), n_draws))
M = rng.standard_normal((n_draws, out_dim, in_dim)) * scales[:, None, None]
null = M @ P_perp                                     # each null[i] @ a == 0
sols = dW[None] + null
norm_min = np.linalg.norm(dW)
norms = np.linalg.norm(sols, axis=(1, 2))
null_norms = np.linalg.norm(null, axis=(1, 2))
print(f"||dW||_F (M1) = {norm_min:.6f};  random solutions: min {norms.min():.6f}, median {np.median(norms):.4f}")
assert np.max(np.abs(null @ a)) <= 1e-12                              # dW' a = 0
assert np.max(np.abs((W + sols) @ a - W @ a_ctx)) <= 1e-12            # still solutions
assert np.all(norms >= norm_min * (1 - 1e-12))                         # never smaller than M1
assert np.allclose(norms**2, norm_min**2 + null_norms**2, rtol=1e-10)  # Pythagoras
assert np.linalg.matrix_rank(sols[0]) > 1                               # others are not rank 1

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
ratio = norms / norm_min
ax[0].hist(ratio, bins=np.geomspace(1.0, ratio.max(), 40), color="tab:blue", alpha=0.8,
           label="random solutions ΔW + ΔW'")
ax[0].axvline(1.0, color="tab:red", lw=2, label=f"M1 (minimum norm, ‖ΔW‖ = {norm_min:.3f})")
ax[0].set_xscale("log")
ax[0].set_xlabel("‖solution‖_F / ‖ΔW_M1‖_F   (solutions of ΔW a = W(a' − a))")
ax[0].set_ylabel("count")
ax[0].legend(fontsize=8)
ax[1].loglog(null_norms, norms - norm_min, ".", ms=2, alpha=0.5)
ax[1].loglog(null_norms, null_norms**2 / (2 * norm_min), "k--", lw=1, label="‖ΔW'‖² / (2‖ΔW‖) (small ΔW')")
ax[1].set_xlabel("‖ΔW'‖_F (null-space part)")
ax[1].set_ylabel("‖ΔW + ΔW'‖_F − ‖ΔW‖_F")
ax[1].legend(fontsize=8)
fig.suptitle("M1 is the minimum-Frobenius-norm solution; every other solution adds an orthogonal part")
fig.tight_layout()
show(fig, "01_min_norm.png")

# %% [markdown]
# ## M2: output absorption
#
# `m2(h, δ)` returns `u = δ`, `v = h/‖h‖²`. It does not even need `W`: whatever `W` is,
# `(W + ΔW) h = W h + δ`. Same three properties: rank one, minimum norm (`δ h⁺`),
# exact.

# %%
W2 = rng.standard_normal((4, 7)) / np.sqrt(7)
h = rng.standard_normal(7)
delta = rng.standard_normal(4)
p2 = m2(h[None], delta[None])
dW2 = p2.dense(0)
err = np.max(np.abs((W2 + dW2) @ h - (W2 @ h + delta)))
print("max |(W + dW) h - (W h + delta)| =", err)
assert err <= 1e-14
assert np.linalg.matrix_rank(dW2) == 1
assert np.allclose(dW2, delta[:, None] @ np.linalg.pinv(h[:, None]), rtol=0, atol=1e-15)
W2_other = rng.standard_normal(W2.shape)              # any other W: same patch works
assert np.max(np.abs((W2_other + dW2) @ h - (W2_other @ h + delta))) <= 1e-14

# %% [markdown]
# M1 is M2 with `δ = W(a' − a)`: the two lemmas are one statement read from the two sides.

# %%
via_m2 = m2(a[None], (W @ (a_ctx - a))[None]).dense(0)
assert np.allclose(via_m2, dW, rtol=0, atol=1e-15)

# %% [markdown]
# ## Token-dependent patches
#
# In a transformer every kept token `t` has its own input `a_t` and its own patch
# `ΔW_t = u_t v_tᵀ`; stacked they are `U [T, out]`, `V [T, in]`. Each patch is exact for its
# own token only: token 0's patch applied to token 1's input does not give `W a'_1`.

# %%
T = 8
A = rng.standard_normal((T, in_dim))
A_ctx = rng.standard_normal((T, in_dim))
pt = m1(W, A, A_ctx)
per_token = np.stack([(W + pt.dense(t)) @ A[t] for t in range(T)])
assert np.max(np.abs(per_token - A_ctx @ W.T)) <= 1e-14
wrong = (W + pt.dense(0)) @ A[1]
print("token 0's patch on token 1: error", np.max(np.abs(wrong - W @ A_ctx[1])))
assert np.max(np.abs(wrong - W @ A_ctx[1])) > 1e-2

# %% [markdown]
# ## Factored application: `x Wᵀ + u (v · x)`
#
# `Rank1.apply(x, y)` takes the unpatched output `y = x Wᵀ` and adds `u_t (v_t · x_t)`: an
# extra `O(T (in + out))` work and memory, never forming the `T` dense `out × in` matrices
# (`O(T · out · in)`). Here with a realistic layer (`out = 1024`, `in = 512`, `T = 32`) we
# check both give the same numbers and time them.

# %% tags=["volatile"]
T, out_dim_big, in_dim_big = 32, 1024, 512
Wb = rng.standard_normal((out_dim_big, in_dim_big)).astype(np.float64) / np.sqrt(in_dim_big)
Xb = rng.standard_normal((T, in_dim_big))
pb = m1(Wb, Xb, rng.standard_normal((T, in_dim_big)))


def factored():
    return pb.apply(Xb, Xb @ Wb.T)                          # x W^T + u (v . x)


def dense():
    dWs = pb.u[:, :, None] * pb.v[:, None, :]               # [T, out, in]: T dense patches
    return np.einsum("toi,ti->to", Wb[None] + dWs, Xb)


def best(fn, n=3):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


t_fact, t_dense = best(factored), best(dense)
extra_flops_fact = 2 * T * (in_dim_big + out_dim_big)
extra_flops_dense = T * out_dim_big * in_dim_big * 3           # build, add, and apply per token
print(f"factored: {t_fact * 1e3:7.2f} ms   dense per-token patches: {t_dense * 1e3:7.2f} ms "
      f"({t_dense / t_fact:.0f}x); extra FLOPs {extra_flops_fact:,} vs {extra_flops_dense:,}; "
      f"dense patch memory {T * out_dim_big * in_dim_big * 8 / 2**20:.0f} MiB")
assert np.allclose(factored(), dense(), rtol=1e-12, atol=1e-12)
assert t_fact < t_dense

# %% [markdown]
# ## The degenerate case: `a = 0`
#
# M1 divides by `‖a‖²` and M2 by `‖h‖²`. When the input is zero there is no witness at all
# (`(W + ΔW) 0 = 0` whatever `ΔW` is), so `m1` and `m2` raise `NotControllableError`
# (MATH.md §7) naming the quantity, its value and the token row — never a NaN.

# %%
A0 = A_ctx.copy()
A0[3] = 0.0
try:
    m1(W, A0, A_ctx)
except NotControllableError as e:
    print("NotControllableError:", e)
    raised = e
else:
    raised = None
assert raised is not None and raised.position == 3 and raised.value == 0.0
assert isinstance(raised, ValueError)

try:
    m2(np.zeros((1, 7)), delta[None])
except NotControllableError as e:
    print("NotControllableError:", e)
    raised2 = e
else:
    raised2 = None
assert raised2 is not None and "h" in raised2.quantity

# %% [markdown]
# A squared norm that underflows below the dtype's smallest normal number counts as zero
# too: `a = 1e-170` in float64 has `‖a‖² ≈ 1e-340`, which is not representable.

# %%
try:
    m1(W, np.full((1, in_dim), 1e-170), a_ctx[None])
    tiny_raised = False
except NotControllableError as e:
    print("NotControllableError:", e)
    tiny_raised = True
assert tiny_raised
