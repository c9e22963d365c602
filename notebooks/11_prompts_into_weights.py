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
# # 11 — Prompts into weights: one task, end to end (MATH.md T1-T5)
#
# A 10-shot prompt teaches Gemma 3 270M a task it cannot do zero-shot (here: the past tense of
# a verb). We write the prompt's effect as weights and check each step:
#
# 1. **the prompt**: zero-shot vs 10-shot on held-out verbs;
# 2. **its patches**: the token-dependent patches of the demonstrations over a few calibration
#    queries (M7, packed, every layer), exact without the demonstrations;
# 3. **the condensed update**: one token-independent change per weight (T2, least squares), exact
#    on every calibration token, next to a thought vector (T1) and the MEMIT-style ridge (T3);
# 4. **held-out accuracy** of the edited model *without* demonstrations;
# 5. **the exported checkpoint**: a Hugging Face folder that `transformers` loads and runs.
#
# The full study (nine tasks, three seeds, every form, 1 to 64 calibration queries) is
# `python -m minipatch icl-tasks`; its table is in the README ("Prompts into weights").

# %%
import tempfile
import warnings

import matplotlib.pyplot as plt
import numpy as np

from minipatch import icl_tasks as it
from minipatch import packed
from minipatch.condense_data import collect, layer_edit
from minipatch.condense_study import head, hidden, log_softmax, scores
from minipatch.icl_tasks import real_model
from minipatch.io.gguf import gemma3_270m_path, read_gguf_metadata
from minipatch.io.tokenizer import decode, tokenizer_from_gguf
from minipatch.figures import show
from minipatch.metrics import rel_err
from minipatch.thought import RankDeficientWarning, condensed_model

model, BOS, encode = real_model("float32")
tok = tokenizer_from_gguf(read_gguf_metadata(gemma3_270m_path()))
V, L = model.cfg.vocab_size, model.cfg.n_layers
examples = it.encode_examples(it.load_task("present-past"), encode)
sp = it.split(examples, seed=0, n_demos=10, n_calib=8, n_held=24)
print(model, f"| present-past: {len(examples)} verbs; 10 demonstrations, 8 calibration, 24 held-out queries")

# %% [markdown]
# ## 1. The prompt
# The 10-shot prompt, then the same queries with and without it. Scoring reads the logits that
# predict the answer's tokens (teacher forcing): *first* token right, and *exact* (every token).

# %%
demos = it.demo_tokens(sp.demos, encode)
print(decode(tok, [BOS, *demos[:40]]) + " ...")
zero = it.batch(BOS, [], sp.held, encode, V)
shot = it.batch(BOS, demos, sp.held, encode, V)
lg_zero, lg_shot = head(model, [hidden(model, zero), hidden(model, shot)])
ref = log_softmax(lg_shot[np.searchsorted(shot.owner, np.arange(24))])        # 10-shot, first answer token
base = {"zero-shot": scores(lg_zero, zero, ref), "10-shot": scores(lg_shot, shot, ref)}
for name, s in base.items():
    print(f"{name:9s}: first token {np.mean(s['first']):.2f}, exact {np.mean(s['exact']):.2f}, "
          f"KL to 10-shot {np.mean(s['kl']):.2f}")
first = lambda lg, bt: [decode(tok, [int(t)]) for t in np.argmax(lg[np.searchsorted(bt.owner, np.arange(4))], -1)]
print("queries:", [e.x for e in sp.held[:4]], "| zero-shot says", first(lg_zero, zero), "| 10-shot says",
      first(lg_shot, shot))
assert np.mean(base["10-shot"]["first"]) > np.mean(base["zero-shot"]["first"]) + 0.5

# %% [markdown]
# ## 2. Its patches
# The 8 calibration queries are packed behind the demonstrations (with context) and behind
# `<bos> Q:` alone (without). `collect` builds M7's patches over the rows without context, every
# layer in closed loop (MATH.md T5, "all"), and for each layer alone ("one"). The patched run
# reproduces the with-context stream at every kept token; without the patches it does not.

# %%
ctx = it.batch(BOS, demos, sp.calib, encode, V)
noctx = it.batch(BOS, [], sp.calib, encode, V)
kept = it.kept_rows(ctx, noctx)
cal_all, cal_one, final = collect(model, ctx, noctx, kept)
err = rel_err(packed.run(model, noctx.pack, patches=cal_all.patches), final[kept])
err0 = rel_err(packed.run(model, noctx.pack), final[kept])
print(f"{noctx.pack.tokens.size} kept tokens, methods {set(cal_all.methods)}: patched vs with-context "
      f"{err:.1e} (float32), unpatched {err0:.2f}")
assert err < 1e-4 and err0 > 1e-2
u = np.array([[np.linalg.norm(cal_all.patches[l]["down_proj.weight"].u[t]) *
               np.linalg.norm(cal_all.patches[l]["down_proj.weight"].v[t]) for t in range(int(cal_all.ends[1]))]
              for l in range(L)])
labels = [repr(decode(tok, [int(t)]))[1:-1] for t in noctx.pack.tokens[:int(cal_all.ends[1])]]
fig, ax = plt.subplots(figsize=(7, 4.4))
im = ax.imshow(np.log10(u + 1e-12), aspect="auto", cmap="magma")
ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=8)
ax.set_ylabel("layer"); ax.set_xlabel("kept token of the first calibration query")
ax.set_title("||dW_t|| of the down-projection's rank-1 patch (M7, all layers)", fontsize=10)
fig.colorbar(im, ax=ax, label="log10"); fig.tight_layout(); show(fig, "11_patches.png")

# %% [markdown]
# ## 3. The condensed update
# T2 per weight: `dW* = (A^+ E)^T` over the calibration tokens, each token once (queries that start
# alike share their first tokens). Fewer tokens than inputs (8 queries' tokens, under the 640
# inputs of gate/up): every calibration token's patch is reproduced, `dW* a_t = u_t`. The same rows give a thought vector per layer (T1) and the
# covariance ridge (T3, `lam` by GCV). The update is dense but of rank at most the number of
# calibration tokens.

# %%
edits = {}
with warnings.catch_warnings():
    warnings.simplefilter("error", RankDeficientWarning)        # each calibration token once: independent rows
    for n in (1, 8):
        per = [layer_edit(model, cal_all, l, n, f) for l in range(L) for f in ("vector", "lstsq", "ridge")]
        edits[f"T1 vector, n={n}"] = {"steer": [per[3 * l]["vector"].steer for l in range(L)]}
        edits[f"T2 lstsq, n={n}"] = {"deltas": [per[3 * l + 1]["lstsq"].deltas for l in range(L)]}
        edits[f"T3 ridge, n={n}"] = {"deltas": [per[3 * l + 2]["ridge"].deltas for l in range(L)]}
        worst = max(r["rel_residual"] for l in range(L) for k, r in per[3 * l + 1]["lstsq"].report.items()
                    if "rank" in r)
        print(f"n = {n}: {cal_all.rows(n).size} distinct calibration tokens; T2 worst relative residual over "
              f"every weight {worst:.1e}")
        assert worst < 1e-10
dw = np.asarray(edits["T2 lstsq, n=8"]["deltas"][9]["down_proj.weight"], np.float64)
sv = np.linalg.svd(dw, compute_uv=False)
print(f"layer 9 down_proj: ||dW|| / ||W|| = {np.linalg.norm(dw) / np.linalg.norm(model.params['layers'][9]['down_proj.weight']):.3f}, "
      f"rank {int(np.sum(sv > sv[0] * 1e-5))} (tokens {cal_all.rows(8).size})")

# %% [markdown]
# ## 4. Held-out accuracy without the demonstrations
# Every edit runs on the zero-shot prompts of the 24 held-out verbs.

# %%
names = list(edits)
lgs = head(model, [hidden(model, zero, **edits[k]) for k in names])
res = {**base, **{k: scores(lg, zero, ref) for k, lg in zip(names, lgs)}}
for k, s in res.items():
    print(f"{k:16s} first {np.mean(s['first']):.2f}  exact {np.mean(s['exact']):.2f}  KL {np.mean(s['kl']):.2f}")
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.bar(range(len(res)), [np.mean(s["first"]) for s in res.values()], color=["0.6", "0.2"] + ["C0", "C1", "C2"] * 2)
ax.set_xticks(range(len(res)), list(res), rotation=30, ha="right", fontsize=8)
ax.set_ylabel("first-token accuracy"); ax.set_title("present-past, 24 held-out verbs, no demonstrations", fontsize=10)
fig.tight_layout(); show(fig, "11_heldout.png")
assert np.mean(res["T2 lstsq, n=8"]["first"]) > np.mean(res["zero-shot"]["first"]) + 0.2

# %% [markdown]
# ## 5. The exported checkpoint
# `condensed_model(...)` is a `Model` with `W + dW*`; `save_pretrained` writes `config.json`
# (`model_type: gemma3_text`) and `model.safetensors` (float32, Gemma's norm weights stored as
# `g`, tied embeddings once). `transformers` loads the folder as it would any Gemma 3 checkpoint,
# and its logits are minipatch's; it answers the zero-shot prompt in the past tense.

# %%
import torch
from transformers import AutoModelForCausalLM

edited = condensed_model(model, edits["T2 lstsq, n=8"]["deltas"])
with tempfile.TemporaryDirectory() as d:
    folder = edited.save_pretrained(d, extra={"bos_token_id": BOS})
    print(sorted(p.name for p in folder.iterdir()), f"{(folder / 'model.safetensors').stat().st_size / 1e9:.2f} GB")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
prompt = np.r_[BOS, encode(it.HEAD), sp.held[0].query]
with torch.no_grad():
    theirs = hf(torch.tensor(prompt[None])).logits[0].numpy()
    out = hf.generate(torch.tensor(prompt[None]), max_new_tokens=3, do_sample=False)[0, prompt.size:]
ours = np.asarray(edited.forward(prompt, window_by="index"))
diff, control = np.abs(theirs - ours).max(), np.abs(theirs - np.asarray(model.forward(prompt))).max()
print(f"transformers vs minipatch: max |logit diff| {diff:.1e}; vs the unedited model {control:.1f}")
print(f"{decode(tok, prompt[1:])!r} -> transformers, no demonstrations: {decode(tok, out.tolist())!r}")
assert diff < 1e-4 and control > 1e-2
