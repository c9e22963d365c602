"""The bad-input catalogue of the public API (files: ``test_bad_input_files.py``; fuzzers:
``test_fuzz_files.py``). One test per category, each asserting the exact error class and that
the message names the offending argument, field, layer or position:

- ``method`` validated per family (API and CLI), listing the family's constructions;
- non-finite parameters and float32 overflow: ``NonFiniteError`` from forward, absorb and greedy,
  never a NaN or a silently wrong number (and no stray numpy warning);
- patches bound to their origin: another model, family, dtype, positions or window convention;
- bounded memory: sliding-window attention never builds a [T, T] array;
- argument edges: ``greedy`` with 0, negative or non-integer ``n_new``; ``dtype``, ``order``,
  ``window_by`` outside their documented sets;
- a hypothesis test that no public call mutates the parameters or the caller's arrays.
"""
from __future__ import annotations

import copy
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minipatch as mp
from minipatch.__main__ import main
from minipatch.errors import (InputError, MethodError, MinipatchError, NonFiniteError, PatchMismatchError,
                              ShapeError)
from minipatch.models import tiny, tiny_gemma

from helpers import fixture

pytestmark = [pytest.mark.m7]

TOK = np.array([5, 9, 3, 17, 4, 11, 8, 2, 30, 6])
CTX = [1, 2, 3]
ALLOWED = {"gemma3": ("auto", "m6a", "m6b", "m6c", "m6d"), "olmo2": ("auto", "m6a", "m6b", "m6c", "m6d"),
           "llama": ("auto", "m2"), "gpt2": ("auto", "m2", "bias"), "mixtral": ("auto", "one", "all"),
           "gptj": ("auto", "m2", "bias")}


def with_param(model, layer, name, value, index=(0, 0)):
    """A copy of ``model`` whose parameter ``name`` (of ``layer``, or top-level when None) has
    ``value`` at ``index``; the original is untouched."""
    p = copy.deepcopy(model.params)
    target = p if layer is None else p["layers"][layer]
    target[name] = np.array(target[name], copy=True)
    target[name][index] = value
    return mp.Model(model.cfg, p)


# ---- method ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(ALLOWED))
@pytest.mark.parametrize("method", ["nonsense", "m6a", "one", "m2", ""])
def test_method_is_validated_per_family(family, method):
    model = tiny(family, seed=0, n_layers=2)
    allowed = ALLOWED[family]
    if method in allowed:
        mp.absorb(model, TOK, CTX, method=method)   # accepted where the family has it
        return
    with pytest.raises(MethodError) as e:
        mp.absorb(model, TOK, CTX, method=method)
    assert isinstance(e.value, ValueError) and isinstance(e.value, MinipatchError)
    assert e.value.allowed == allowed and e.value.method == method
    assert all(repr(a) in str(e.value) for a in allowed) and repr(method) in str(e.value)
    with pytest.raises(MethodError):
        mp.greedy(model, TOK, 1, context=CTX, method=method)


def test_audit_cli_refuses_an_unknown_method(capsys):
    folder = fixture("llama")
    code = main(["audit", str(folder), "--reference", str(folder / "reference.npz"), "--method", "nonsense"])
    err = capsys.readouterr().err
    assert code == 2 and "'nonsense'" in err and "'m2'" in err


# ---- non-finite values ---------------------------------------------------------------------

@pytest.mark.parametrize("family,layer,name,sublayer", [
    ("llama", 1, "down_proj.weight", "mlp"),
    ("gemma3", 0, "up_proj.weight", "mlp"),
    ("gpt2", 1, "q_proj.weight", "attention"),
    ("mixtral", 0, "experts.down_proj.weight", "mlp"),
])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_parameter_is_named(family, layer, name, sublayer, value):
    base = tiny(family, seed=1, n_layers=2)
    index = (0, 0, 0) if name.startswith("experts.") else (0, 0)
    bad = with_param(base, layer, name, value, index)
    for call in (lambda: bad.forward(TOK), lambda: mp.absorb(bad, TOK, CTX), lambda: mp.greedy(bad, TOK, 2),
                 lambda: mp.greedy(bad, TOK, 2, context="all_but_last")):
        with pytest.raises(NonFiniteError) as e:
            call()
        assert e.value.layer == layer and e.value.sublayer == sublayer, str(e.value)
        assert f"layer {layer}" in str(e.value) and "token position" in str(e.value)
    assert np.all(np.isfinite(base.forward(TOK)))          # the original model is untouched


def test_non_finite_embedding_row_names_the_token_position():
    base = tiny_gemma(seed=0, n_layers=2)
    bad = with_param(base, None, "embed.weight", np.nan, (int(TOK[4]), 3))
    with pytest.raises(NonFiniteError) as e:
        bad.forward(TOK)
    assert e.value.position == 4 and e.value.layer == 0


def test_float32_overflow_is_an_error_not_a_wrong_answer():
    """Embeddings x 1e20: in float32 the norms' mean squares overflow; without the check the
    logits would be finite and wrong (x / sqrt(inf) = 0). float64 still runs."""
    base = tiny_gemma(seed=0, n_layers=2)
    p = copy.deepcopy(base.params)
    p["embed.weight"] = p["embed.weight"] * 1e20
    big64 = mp.Model(base.cfg, p)
    assert np.all(np.isfinite(big64.forward(TOK)))
    big32 = big64.astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # and no stray RuntimeWarning on the way
        for call in (lambda: big32.forward(TOK), lambda: mp.absorb(big32, TOK, CTX)):
            with pytest.raises(NonFiniteError, match="overflow.*float64"):
                call()


# ---- patches bound to their origin ---------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_res():
    model = tiny_gemma(seed=0, n_layers=2, sliding_window=4)
    return model, mp.absorb(model, TOK, CTX)


def test_patches_refused_on_another_model(gemma_res):
    model, res = gemma_res
    kept = TOK[res.kept]
    other_seed = tiny_gemma(seed=1, n_layers=2, sliding_window=4)
    with pytest.raises(PatchMismatchError, match="another model"):
        other_seed.forward(kept, positions=res.kept, patches=res.patches)
    nudged = with_param(model, 1, "mlp_post_norm.weight", 0.5, (3,))    # one entry of one parameter
    with pytest.raises(PatchMismatchError, match="another model"):
        nudged.forward(kept, positions=res.kept, patches=res.patches)
    with pytest.raises(PatchMismatchError):
        model.astype("float32").forward(kept, positions=res.kept, patches=res.patches)
    llama = tiny("llama", seed=0, n_layers=2)
    with pytest.raises((PatchMismatchError, ShapeError)):
        llama.forward(kept, positions=res.kept, patches=res.patches)


def test_patches_refused_for_other_positions_or_convention(gemma_res):
    model, res = gemma_res
    kept = TOK[res.kept]
    with pytest.raises(PatchMismatchError, match="made for positions"):
        model.forward(kept, positions=res.kept + 1, patches=res.patches)
    with pytest.raises(PatchMismatchError, match="window_by"):
        model.forward(kept, positions=res.kept, patches=res.patches, window_by="index")
    assert issubclass(PatchMismatchError, InputError)


def test_forward_accepts_an_absorb_result(gemma_res):
    model, res = gemma_res
    a = model.forward(TOK[res.kept], positions=res.kept, patches=res)
    b = model.forward(TOK[res.kept], positions=res.kept, patches=res.patches)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="Patches"):
        model.forward(TOK[res.kept], positions=res.kept, patches={"not": "patches"})


# ---- bounded memory --------------------------------------------------------------------------

def test_sliding_window_attention_memory_is_bounded():
    """T = 20000 tokens through a sliding-window layer (window 4): a [T, T] boolean mask alone
    would be 400 MB and the float64 scores 6.4 GB; the blocked attention stays far below."""
    model = tiny_gemma(seed=0, n_layers=1, sliding_window=4, layer_types=("sliding",))
    T = 20_000
    tok = np.arange(T) % 250 + 3
    tracemalloc.start()
    try:
        x = model.run(tok, head=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (T, model.cfg.d_model) and np.all(np.isfinite(x))
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"


# ---- argument edges ----------------------------------------------------------------------------

def test_greedy_n_new_edges():
    model = tiny_gemma(seed=0, n_layers=2)
    ids, logits = mp.greedy(model, TOK, 0)
    assert ids.shape == (0,) and logits.shape == (0, model.cfg.vocab_size)
    ids, logits = mp.greedy(model, TOK, 0, context="all_but_last")
    assert ids.shape == (0,)
    for bad in (-1, 2.5, "3", True, None):
        with pytest.raises(InputError, match="n_new"):
            mp.greedy(model, TOK, bad)


@pytest.mark.parametrize("call,word", [
    (lambda m: m.astype("bfloat16"), "bfloat16"),
    (lambda m: m.astype(3.5), "3.5"),
    (lambda m: m.astype("int64"), "int64"),
    (lambda m: mp.absorb(m, TOK, CTX, order="sideways"), "sideways"),
    (lambda m: mp.absorb(m, TOK, CTX, window_by="tokens"), "tokens"),
    (lambda m: m.forward(TOK, window_by=None), "window_by"),
    (lambda m: mp.load(fixture("llama"), dtype=3.5), "3.5"),
    (lambda m: mp.load(fixture("llama"), dtype="bfloat16"), "bfloat16"),
    (lambda m: mp.absorb(m, TOK.astype(float), CTX), "integer"),
    (lambda m: mp.absorb(m, TOK, [0.5]), "context"),
])
def test_arguments_outside_their_documented_set(call, word):
    model = tiny_gemma(seed=0, n_layers=1)
    with pytest.raises(MinipatchError) as e:
        call(model)
    assert isinstance(e.value, ValueError) and word in str(e.value)


# ---- nothing is mutated (hypothesis) -------------------------------------------------------

FAMILIES = ("gemma3", "llama", "gpt2", "mixtral", "gptj", "olmo2")
_MODELS = {}


def _frozen_model(family):
    """A tiny model whose every parameter is read-only (a write in place would raise)."""
    if family not in _MODELS:
        base = tiny(family, seed=3, n_layers=2)

        def freeze(a):
            a = np.array(a, copy=True)
            a.flags.writeable = False
            return a

        p = {k: freeze(v) for k, v in base.params.items() if k != "layers"}
        p["layers"] = [{k: freeze(v) for k, v in lp.items()} for lp in base.params["layers"]]
        _MODELS[family] = (mp.Model(base.cfg, p), copy.deepcopy(base.params))
    return _MODELS[family]


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), n=st.integers(3, 12), data=st.data(),
       order=st.sampled_from(("closed", "open")), window_by=st.sampled_from(("position", "index")))
def test_no_public_call_mutates_anything(family, n, data, order, window_by):
    model, before = _frozen_model(family)
    tok = np.array(data.draw(st.lists(st.integers(0, model.cfg.vocab_size - 1), min_size=n, max_size=n)))
    ctx = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))))
    tok_copy, ctx_copy = tok.copy(), ctx.copy()
    tok.flags.writeable = ctx.flags.writeable = False
    model.forward(tok, trace={}, window_by=window_by)
    res = mp.absorb(model, tok, ctx, order=order, window_by=window_by)
    mp.patched_forward(model, tok, res)
    mp.greedy(model, tok, 2, context="all_but_last")
    _, cache = model.prefill(tok)
    model.step(cache, int(tok[0]))
    _, stream = mp.absorb_prefill(model, tok, ctx)
    mp.absorb_step(model, stream, int(tok[-1]))
    np.testing.assert_array_equal(tok, tok_copy)
    np.testing.assert_array_equal(ctx, ctx_copy)
    for k, v in before.items():
        if k != "layers":
            np.testing.assert_array_equal(model.params[k], v)
    for lp, lb in zip(model.params["layers"], before["layers"], strict=True):
        for k in lb:
            np.testing.assert_array_equal(lp[k], lb[k])
