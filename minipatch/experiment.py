"""The generation experiment of Goldwaser et al. 2025, section 4, on a real model (MATH.md M6, M7).

For each prompt: greedy decoding of ``n_new`` tokens by the model *with* the whole
sequence as context (the reference), versus greedy decoding by the *patched* model that
sees only the current token at its absolute position (``context='all_but_last'``): at
every step the whole prefix is absorbed into token-dependent weight patches (M7), with the
post-FFW norm witness M6a (elementwise scale patch), M6c (trust-region target plus residual)
or M6d (M6b's direction with a floored multiplier plus residual; see minipatch.m6).
Both runs are free-running: each continues from its own tokens. Reported per step, while
the two sequences still agree (up to and including the first step whose tokens differ,
whose logits are still computed from identical prefixes):

- ``abs_err``: max over the vocabulary of |patched - with-context| logits;
- ``rel_err``: the same divided by max |with-context logits|;
- token agreement: ``first_divergence`` (the first step whose tokens differ, None if none),
  ``prefix_agree`` (steps before it) and ``agree`` (positions with equal tokens).

The reference run is computed once per prompt and dtype and shared by the methods. By
default every run of a dtype is advanced together (:mod:`minipatch.lockstep`: one batched
with-context step for all sequences, every run's patched token through each layer at once);
``engine='single'`` runs each alone through :func:`~minipatch.decode.greedy`. Both compute
the same values; they differ by rounding only (matmuls of other shapes), which is what
separates the runs of an ill-conditioned construction (M6a in float32 and bfloat16). The
Markdown table (``format_table``) and the figure (``plot``) are in
:mod:`minipatch.experiment_report`.

Dtypes:

- ``float64``: the model as loaded in float64, every computation in float64.
- ``float32``: the same weights cast to float32, every computation in float32.
- ``bfloat16`` (simulated, via ``ml_dtypes``): every stored parameter (embedding, norm
  multipliers as stored, projections) rounded to the nearest bfloat16 (round to nearest
  even) and kept as float32; every patch factor (Rank1 ``u`` and ``v``, Shift ``d``, Scale
  ``add`` and ``mul``) rounded to bfloat16 the same way after ``absorb`` and before the
  patched forward; all arithmetic (forward, absorb, attention, norms) in float32. The
  reference is the with-context model with the same bf16-rounded weights, computed in
  float32. Only weights and patches are bf16: activations are not rounded, so this isolates
  the error of storing the patches in bf16.

Command line: ``python -m minipatch experiment`` (:mod:`minipatch.cli.experiment`).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .decode import greedy
from .backend import to_numpy
from .errors import InputError, MinipatchError
from .lockstep import Run, lockstep_greedy, scale_sizes
from .patches import Patches, Rank1, Scale, Shift

PROMPTS = (   # the five prompts of the shared Gemma 3 270M fixtures (prompts.json)
    "Write a weather forecast for Mars in the voice of an annoyed robot.",
    "Explain the meaning of life in exactly twenty words without using the letter e.",
    "Explain what a software bug is to a peasant from the sixteenth century.",
    "Write a haiku about Jack, Fred and Alice.",
    "Write a rhyming couplet about absorbing prompts into the weights of an MLP.",
)

DTYPES = ("float32", "float64", "bfloat16")
METHODS = ("m6a", "m6b", "m6c", "m6d")
ORDERS = ("closed", "open")


# ---- simulated bfloat16 --------------------------------------------------------------------

def bf16_round(a):
    """``a`` rounded to the nearest bfloat16 (ties to even), returned as float32 (same shape)."""
    import ml_dtypes

    return np.asarray(to_numpy(a), dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def round_params(params, fn=bf16_round):
    """A copy of a parameter dict (nested: 'layers' list of dicts) with ``fn`` applied to every array."""
    out = {k: fn(v) for k, v in params.items() if k != "layers"}
    out["layers"] = [{k: fn(v) for k, v in lp.items()} for lp in params["layers"]]
    return out


def round_layer(layer_patch, fn=bf16_round):
    """A copy of one layer patch (dict) with every factor (u, v, d, add, mul) passed through ``fn``."""
    def one(p):
        if isinstance(p, Rank1):
            return Rank1(fn(p.u), fn(p.v))
        if isinstance(p, Shift):
            return Shift(fn(p.d))
        if isinstance(p, Scale):
            return Scale(None if p.add is None else fn(p.add), None if p.mul is None else fn(p.mul))
        raise TypeError(f"unknown patch type {type(p).__name__}")

    return {k: one(p) for k, p in layer_patch.items()}


def round_patches(patches, fn=bf16_round):
    """A copy of :class:`Patches` with every layer passed through :func:`round_layer`."""
    return Patches(tuple(round_layer(lp, fn) for lp in patches.layers), patches.positions, patches.methods,
                   patches.origin)


def model_for(model64, dtype):
    """(model, patch rounding function or None) for 'float64', 'float32' or 'bfloat16'."""
    from .model import Model

    if dtype == "float64":
        return model64, None
    if dtype == "float32":
        return model64.astype("float32"), None
    if dtype == "bfloat16":
        return Model(model64.cfg, round_params(model64.params)), bf16_round
    raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")


# ---- the two runs ----------------------------------------------------------------------------

class ScaleWatch:
    """A ``patch_fn`` for :func:`~minipatch.decode.greedy`: passes each layer patch through
    ``round_fn`` (None: unchanged) and records the largest |scale patch| seen
    (:func:`~minipatch.lockstep.scale_sizes`)."""

    def __init__(self, round_fn=None):
        self.round_fn, self.largest = round_fn, 0.0

    def __call__(self, layer_patch):
        n = next(iter(layer_patch.values())).n_tokens if layer_patch else 0
        if n:
            self.largest = max(self.largest, float(np.max(scale_sizes(layer_patch, n))))
        return layer_patch if self.round_fn is None else round_layer(layer_patch, self.round_fn)


def patched_greedy(model, tokens, n_new, method, round_fn=None, callback=None, order="closed"):
    """Greedy decoding by the patched model that sees only the current token (M7, 'all_but_last').

    Same as ``minipatch.greedy(model, tokens, n_new, context='all_but_last', method=method,
    order=order)``, with the patches passed through ``round_fn`` (e.g. :func:`bf16_round`).
    KV-cached: each new token costs one cached with-context step and one patched
    single-token pass.

    Returns:
      (ids int64 [n_new], last-position logits numpy [n_new, V], largest |scale patch|).
    """
    watch = ScaleWatch(round_fn)
    ids, rows = greedy(model, tokens, n_new, context="all_but_last", method=method, callback=callback,
                       patch_fn=watch, order=order)
    return ids, rows, watch.largest


def compare(ref_ids, ids, abs_err, scale):
    """Per-step errors up to the first divergence, and the token agreement counts.

    Args:
      ref_ids, ids: [n] the with-context and the patched run's tokens. abs_err: [n] per step,
      max |patched - with-context logits|. scale: [n] max |with-context logits|.
    """
    ref_ids, ids = np.asarray(ref_ids), np.asarray(ids)
    diff = np.flatnonzero(ref_ids != ids)
    first = int(diff[0]) if diff.size else None
    upto = len(ref_ids) if first is None else first + 1
    abs_err = np.asarray(abs_err[:upto], dtype=np.float64)
    return dict(abs_err=abs_err.tolist(), rel_err=(abs_err / np.asarray(scale[:upto])).tolist(),
                first_divergence=first, prefix_agree=len(ref_ids) if first is None else first,
                agree=int(np.sum(ref_ids == ids)), tokens=ids.tolist())


class _Progress:
    """tqdm if installed, else a counter on stderr."""

    def __init__(self, total, enabled):
        self.total, self.n, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="experiment", unit="step", file=sys.stderr)
            except ImportError:
                pass

    def step(self, label=""):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r[{self.n}/{self.total}] {label}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


ENGINES = ("lockstep", "single")


def run_experiment(model64, tokenizer, prompts, n_new=20, dtypes=DTYPES, methods=METHODS, progress=True,
                   orders=ORDERS, engine="lockstep"):
    """The section-4 experiment: with-context greedy vs patched greedy with only the current token.

    Args:
      model64: the model in float64 (other dtypes are derived from it, see the module docstring).
      tokenizer: from :func:`minipatch.io.tokenizer.tokenizer_from_gguf` (BOS is prepended).
      prompts: list of prompt texts.
      n_new: new tokens per prompt. dtypes: subset of ('float32', 'float64', 'bfloat16').
      methods: post-FFW norm witnesses to compare ('m6a', 'm6b', 'm6c', 'm6d', 'auto').
      progress: show a progress bar on stderr.
      orders: M7's order of construction, 'closed' and/or 'open' (MATH.md M7).
      engine: 'lockstep' (every run of a dtype advanced together,
        :func:`~minipatch.lockstep.lockstep_greedy`) or 'single' (each run alone through
        :func:`~minipatch.decode.greedy`, the path users call). The two compute the same
        thing with different matmul shapes, so they differ by rounding only.
    Returns:
      dict: ``runs`` (one entry per prompt x dtype x method, see :func:`compare`, plus the
      reference tokens and texts), ``summary`` (per dtype and method: token agreement,
      max and mean logit errors over the compared steps), ``seconds``, ``n_new``, ``engine``.
    """
    from .io.tokenizer import decode, encode

    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    t0 = time.perf_counter()
    toks = [np.asarray(encode(tokenizer, p), dtype=np.int64) for p in prompts]
    per_dtype = n_new if engine == "lockstep" else len(prompts) * (1 + len(methods) * len(orders))
    bar = _Progress(len(dtypes) * per_dtype, progress)
    runs = []
    for dtype in dtypes:
        model, round_fn = model_for(model64, dtype)
        if engine == "lockstep":
            patch_fn = None if round_fn is None else (lambda lp, f=round_fn: round_layer(lp, f))
            refs, done = lockstep_greedy(model, toks, n_new, methods, orders, patch_fn,
                                         callback=lambda s, d=dtype: bar.step(d))
        else:
            refs, done = _single_runs(model, toks, n_new, methods, orders, round_fn, lambda d=dtype: bar.step(d))
        for r in done:
            ref = refs[r.prompt]
            entry = dict(prompt=r.prompt, text=prompts[r.prompt], dtype=dtype, method=r.method, order=r.order,
                         ref_tokens=ref["ids"].tolist(), ref_text=decode(tokenizer, ref["ids"]))
            if r.error is None:
                ids = np.asarray(r.ids, np.int64)
                entry.update(compare(ref["ids"], ids, r.abs_err, ref["scale"]), text_patched=decode(tokenizer, ids),
                             largest_scale=float(r.largest), error=None)
            else:                              # a witness that does not exist for this input
                entry.update(error=r.error, abs_err=[], rel_err=[], agree=0, prefix_agree=0, first_divergence=0,
                             tokens=[], largest_scale=None)
            runs.append(entry)
        del model
    bar.close()
    return dict(n_new=n_new, prompts=list(prompts), runs=runs, summary=summarize(runs, n_new),
                seconds=time.perf_counter() - t0, engine=engine)


def _single_runs(model, toks, n_new, methods, orders, round_fn, tick):
    """What :func:`~minipatch.lockstep.lockstep_greedy` returns, one run at a time through
    :func:`~minipatch.decode.greedy` (the 'single' engine)."""
    refs, runs = [], []
    for k, tok in enumerate(toks):
        ids, rows = greedy(model, tok, n_new)
        rows = rows.astype(np.float64)
        refs.append(dict(ids=ids, scale=np.max(np.abs(rows), axis=-1)))
        tick()
        for order in orders:
            for m in methods:
                run = Run(k, m, order)
                try:
                    got, prow, run.largest = patched_greedy(model, tok, n_new, m, round_fn, order=order)
                    run.ids = got.tolist()
                    run.abs_err = np.max(np.abs(prow.astype(np.float64) - rows), axis=-1).tolist()
                except MinipatchError as e:   # a witness that does not exist for this input
                    run.error = f"{type(e).__name__}: {e}"
                runs.append(run)
                tick()
    return refs, runs


def summarize(runs, n_new):
    """Per (dtype, order, method): agree / prefix_agree out of n_prompts * n_new, max and mean
    errors, the largest scale patch, and how many prompts had no witness (``errors``)."""
    out = {}
    for r in runs:
        order = r.get("order", "closed")
        s = out.setdefault(f"{r['dtype']}/{order}/{r['method']}", dict(
            dtype=r["dtype"], order=order, method=r["method"], agree=0, prefix_agree=0, total=0, abs=[],
            rel=[], errors=0, largest_scale=None))
        if r.get("largest_scale") is not None:
            s["largest_scale"] = max(s["largest_scale"] or 0.0, r["largest_scale"])
        s["agree"] += r["agree"]
        s["prefix_agree"] += r["prefix_agree"]
        s["total"] += n_new
        s["abs"] += r["abs_err"]
        s["rel"] += r["rel_err"]
        s["errors"] += r["error"] is not None
    for s in out.values():
        a, rl = np.asarray(s.pop("abs")), np.asarray(s.pop("rel"))
        s.update(max_abs_err=float(a.max()) if a.size else None, mean_abs_err=float(a.mean()) if a.size else None,
                 max_rel_err=float(rl.max()) if rl.size else None, mean_rel_err=float(rl.mean()) if rl.size else None)
    return out
