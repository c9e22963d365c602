"""The experiment's engine (minipatch.lockstep; MATH.md M7, ``context='all_but_last'``): many
absorbed greedy runs advanced together give what each gives alone.

- a token that sees only itself: its attention output is its value, projected
  (``own_attention_values``), equal to the attention sublayer run on that token alone;
- several sequences stepped at once (``step_many``) equal one cached step each;
- ``lockstep_greedy`` equals ``greedy(..., context='all_but_last')`` run by run (tokens,
  per-step logit errors, largest scale patch, and the error a run stops with), in every
  family, with and without divergence; its patched runs are exact (float64 <= 1e-10,
  float32 <= 1e-4) and an unpatched single token is not (the negative control).
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import CONTROL_MIN, TOL32, TOL64_BLOCK, TOL64_MODEL, rel_err
from minipatch.decode import greedy, step_many
from minipatch.blocks import attention_values, own_attention_values
from minipatch.config import FAMILIES
from minipatch.errors import MinipatchError
from minipatch.experiment import patched_greedy, round_layer
from minipatch.lockstep import lockstep_greedy
from minipatch.models import tiny
from minipatch.patches import Rank1, Scale, stack_patches

pytestmark = pytest.mark.m7


def prompts(model, lengths=(5, 9, 1), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.cfg.vocab_size, n) for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_own_attention_is_each_token_alone(family):
    model = tiny(family, seed=3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, model.cfg.d_model))
    pos = np.asarray([3, 7, 8, 20, 21])
    for l, lp in enumerate(model.params["layers"]):
        own = own_attention_values(model.spec, lp, x, model.cfg)
        alone = [attention_values(model.spec, lp, x[i:i + 1], model.cfg, l, pos[i:i + 1]) for i in range(5)]
        for k in ("z", "a", "o"):
            want = np.concatenate([getattr(r, k) for r in alone])
            assert rel_err(getattr(own, k), want) <= TOL64_BLOCK, (l, k)
        together = attention_values(model.spec, lp, x, model.cfg, l, pos)     # the tokens see each other
        assert rel_err(own.a[1:], together.a[1:]) >= CONTROL_MIN


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("window_by", ["position", "index"])
def test_step_many_is_one_step_each(family, window_by):
    model = tiny(family, seed=2)
    seqs = prompts(model, (6, 2, 11, 1))
    caches = [model.prefill(s, window_by=window_by)[1] for s in seqs]
    toks = [3, 5, 7, 11]
    xf, new, embed, layers = step_many(model, caches, toks)
    for i, (c, t) in enumerate(zip(caches, toks)):
        trace = {}
        want, cache = model.step(c, t, trace=trace, head=False)
        assert rel_err(xf[i], want) <= TOL64_BLOCK
        assert rel_err(embed[i], trace["embed"][0]) == 0.0
        for l, tr in enumerate(trace["layers"]):
            assert rel_err(layers[l]["out"][i], tr["out"][0]) <= TOL64_BLOCK
        # the extended caches are the steps' caches: one more step from each agrees too
        again = model.step(new[i], 13, head=False)[0]
        assert rel_err(again, model.step(cache, 13, head=False)[0]) <= TOL64_BLOCK
    wrong = step_many(model, caches[::-1], toks)[0]                  # another sequence's cache
    assert rel_err(wrong[0], xf[0]) >= CONTROL_MIN


def single_run(model, tokens, n_new, method, order, round_fn=None):
    """(ids, per-step max |logit error| against the with-context run, largest scale, error)."""
    try:
        ids, rows, big = patched_greedy(model, tokens, n_new, method, round_fn, order=order)
    except MinipatchError as e:
        return None, None, None, f"{type(e).__name__}: {e}"
    ref = greedy(model, tokens, n_new)[1]
    return ids, np.max(np.abs(rows - ref), axis=-1), big, None


def assert_same_as_single_runs(model, toks, n_new, methods, orders, round_fn=None):
    fn = None if round_fn is None else (lambda lp: round_layer(lp, round_fn))
    refs, runs = lockstep_greedy(model, toks, n_new, methods, orders, fn)
    assert len(runs) == len(toks) * len(methods) * len(orders)
    for k, tk in enumerate(toks):
        ids, rows = greedy(model, tk, n_new)
        np.testing.assert_array_equal(refs[k]["ids"], ids)
        np.testing.assert_allclose(refs[k]["scale"], np.max(np.abs(rows), axis=-1), rtol=1e-13)
    for r in runs:
        ids, err, big, error = single_run(model, toks[r.prompt], n_new, r.method, r.order, round_fn)
        assert r.error == error, (r, error)
        if error is None:
            np.testing.assert_array_equal(r.ids, ids)
            scale = refs[r.prompt]["scale"]
            if not (r.method == "m6a" and r.order == "open"):   # that one amplifies rounding (MATH.md M7)
                assert np.max(np.abs(np.asarray(r.abs_err) - err) / scale) <= TOL64_MODEL, r
            assert abs(r.largest - big) <= 1e-9 * max(big, 1.0), (r, big)
    return refs, runs


@pytest.mark.parametrize("family", FAMILIES)
def test_lockstep_is_each_run_alone(family):
    model = tiny(family, seed=1)
    methods = model.spec.outer.methods(model.cfg)
    refs, runs = assert_same_as_single_runs(model, prompts(model), 5, methods, ("closed", "open"))
    for r in runs:                                   # exact, run by run (MATH.md M7)
        if r.error is None and (r.order == "closed" or r.method != "m6a"):
            rel = np.asarray(r.abs_err) / refs[r.prompt]["scale"]
            assert r.ids == refs[r.prompt]["ids"].tolist() and rel.max() <= TOL64_MODEL, r


@pytest.mark.m6
@pytest.mark.gemma
def test_lockstep_run_without_witness_stops_alone():
    """1 + g = 0 at one coordinate of layer 1's post-MLP norm: M6b has no witness there and its
    runs stop with the error they raise alone; every other run goes on."""
    base = tiny("gemma3", seed=4)
    layers = [dict(lp) for lp in base.params["layers"]]
    g = layers[1]["mlp_post_norm.weight"].copy()
    g[5] = -1.0
    layers[1]["mlp_post_norm.weight"] = g
    model = type(base)(base.cfg, {**base.params, "layers": layers})
    _, runs = assert_same_as_single_runs(model, prompts(model), 4, ("m6a", "m6b", "m6c", "m6d", "auto"),
                                         ("closed", "open"))
    stopped = [r for r in runs if r.error is not None]
    assert stopped and all(r.method == "m6b" and "layer 1" in r.error for r in stopped)
    assert all(r.error is None for r in runs if r.method != "m6b")


@pytest.mark.gemma
def test_lockstep_branches_like_single_runs():
    """Coarsely rounded patches make runs leave the with-context tokens: each then continues
    from its own tokens (its own with-context cache branch), exactly as alone."""
    model = tiny("gemma3", seed=1)
    coarse = lambda a: np.round(np.asarray(a) * 16) / 16
    refs, runs = assert_same_as_single_runs(model, prompts(model, (5, 9, 1, 3)), 8, ("m6a", "m6c", "m6d"),
                                            ("closed", "open"), coarse)
    diverged = [r for r in runs if r.ids != refs[r.prompt]["ids"].tolist()]
    assert diverged and len({tuple(r.ids) for r in diverged}) > 1


@pytest.mark.gemma
def test_lockstep_float32_exact_and_negative_control():
    model = tiny("gemma3", seed=1).astype("float32")
    toks = prompts(model)
    refs, runs = lockstep_greedy(model, toks, 4, ("m6c", "m6d"), ("closed",))
    for r in runs:
        assert max(np.asarray(r.abs_err) / refs[r.prompt]["scale"]) <= TOL32
    # negative control: the current token alone, unpatched, is far from the with-context run
    for k, tk in enumerate(toks):
        if tk.size > 1:
            alone = model.forward(tk[-1:], positions=[tk.size - 1])[0]
            full = model.forward(tk)[-1]
            assert rel_err(alone, full) >= CONTROL_MIN


def test_stack_patches_fills_exact_no_ops():
    rng = np.random.default_rng(0)
    a = {"w": Rank1(rng.standard_normal((2, 3)), rng.standard_normal((2, 4))),
         "s": Scale(add=rng.standard_normal((2, 3)))}
    b = {"s": Scale(mul=rng.standard_normal((1, 1)))}
    st = stack_patches([a, b])
    x = rng.standard_normal((3, 4))
    y = rng.standard_normal((3, 3))
    out = st["w"].apply(x, y)
    np.testing.assert_array_equal(out[2], y[2])                       # b's row: no rank-1 patch
    np.testing.assert_array_equal(out[:2], a["w"].apply(x[:2], y[:2]))
    s = rng.standard_normal(3)
    m = st["s"].multiplier(s)
    np.testing.assert_array_equal(m[:2], a["s"].multiplier(s))        # a's rows: unit mul
    np.testing.assert_array_equal(m[2:], b["s"].multiplier(s))        # b's row: zero add


def test_lockstep_refuses_bad_arguments():
    from minipatch.errors import InputError, MethodError

    model = tiny("llama", seed=0)
    toks = prompts(model)
    with pytest.raises(MethodError, match="m6a"):
        lockstep_greedy(model, toks, 2, ("m6a",))              # a Gemma construction on Llama
    with pytest.raises(InputError, match="order"):
        lockstep_greedy(model, toks, 2, ("m2",), ("sideways",))
    with pytest.raises(InputError):
        lockstep_greedy(model, [], 2, ("m2",))
    with pytest.raises(InputError):
        lockstep_greedy(model, toks, -1, ("m2",))
    refs, runs = lockstep_greedy(model, toks, 0, ("m2",))
    assert all(r["ids"].size == 0 for r in refs) and all(r.ids == [] for r in runs)


@pytest.mark.backend
def test_lockstep_on_every_backend(backend):
    """The experiment's engine and the greedy path it is compared with, on every array backend
    (array-api-strict's second device refuses stray numpy calls, as CuPy would)."""
    from minipatch.backend import to_numpy

    xp, dev = backend
    base = tiny("gemma3", seed=1)
    model = base if xp is np else base.to(xp, dev)
    toks = prompts(base, (5, 3))
    refs, runs = lockstep_greedy(model, toks, 3, ("m6c", "m6d"), ("closed", "open"))
    for k, tk in enumerate(toks):
        np.testing.assert_array_equal(refs[k]["ids"], greedy(base, tk, 3)[0])
    for r in runs:
        assert r.error is None and r.ids == refs[r.prompt]["ids"].tolist()
        assert max(np.asarray(r.abs_err) / refs[r.prompt]["scale"]) <= TOL64_MODEL
    alone = to_numpy(model.forward(toks[0][-1:], positions=[toks[0].size - 1]))[0]
    assert rel_err(alone, to_numpy(model.forward(toks[0]))[-1]) >= CONTROL_MIN
