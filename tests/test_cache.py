"""MATH.md M7 streamed: the KV cache (Model.prefill / Model.step) and streaming absorb
(absorb_prefill / absorb_step) against the uncached forward and batch absorb, per family."""
import numpy as np
import pytest

import minipatch as mp
from minipatch.backend import to_numpy
from minipatch.config import FAMILIES
from minipatch.models import tiny
from helpers import CONTROL_MIN, TOL32, TOL64_MODEL, rel_err

pytestmark = pytest.mark.m7
TOL_CACHE = 1e-13          # cached vs uncached logits, float64 (issue bar)
TOL_STREAM = 1e-12         # streaming vs batch absorb, float64


def model_of(family, **kw):
    """Small models that exercise windows (gemma3: window 4), soft-caps (gemma2), learned
    positions (gpt2), parallel blocks (gptj/neox/parallel) and experts (mixtral/qwen2_moe)."""
    return tiny(family, seed=3, n_layers=3, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_forward(family):
    model = model_of(family)
    tok = np.random.default_rng(0).integers(0, 256, 14)
    full = to_numpy(model.forward(tok))
    logits, cache = model.prefill(tok[:9])
    rows = [to_numpy(logits)]
    for t in tok[9:]:
        logits, cache = model.step(cache, int(t))
        rows.append(to_numpy(logits))
    assert rel_err(np.stack(rows), full[8:]) <= TOL_CACHE
    assert cache.n == 14 and cache.last == 13
    # negative control: a step that forgets the cache (no past keys) is far off
    alone = to_numpy(model.forward(tok[13:], positions=[13]))
    assert rel_err(alone, full[13:]) > CONTROL_MIN


def test_cache_is_functional_and_branches():
    """Stepping twice from one cache gives two branches; neither sees the other's token."""
    model = model_of("gemma3")
    tok = np.random.default_rng(1).integers(0, 256, 8)
    _, c = model.prefill(tok)
    a, ca = model.step(c, 5)
    b, cb = model.step(c, 7)          # same parent: must not overwrite branch a
    a2, _ = model.step(ca, 9)
    want_a2 = to_numpy(model.forward(np.r_[tok, 5, 9]))[-1]
    want_b = to_numpy(model.forward(np.r_[tok, 7]))[-1]
    assert rel_err(a2, want_a2) <= TOL_CACHE and rel_err(b, want_b) <= TOL_CACHE
    assert c.n == 8 and ca.n == 9 and cb.n == 9


def test_cache_grows_past_its_capacity_and_uses_index_convention():
    model = model_of("gemma3")
    tok = np.random.default_rng(2).integers(0, 256, 40)
    for window_by in ("position", "index"):
        full = to_numpy(model.forward(tok, window_by=window_by))
        logits, cache = model.prefill(tok[:3], window_by=window_by)
        for t in tok[3:]:
            logits, cache = model.step(cache, int(t))
        assert rel_err(logits, full[-1]) <= TOL_CACHE


def test_step_with_positions_and_patches_float32():
    model = model_of("llama", dtype=np.float32)
    tok = np.random.default_rng(3).integers(0, 256, 12)
    full = to_numpy(model.forward(tok))
    _, cache = model.prefill(tok[:6])
    logits, cache = model.step(cache, tok[6:], position=np.arange(6, 12))
    assert rel_err(logits, full[-1]) <= TOL32


def test_step_refuses_bad_positions():
    model = model_of("llama")
    _, cache = model.prefill([1, 2, 3])
    with pytest.raises(mp.errors.InputError, match="not after"):
        model.step(cache, 4, position=2)
    with pytest.raises(mp.errors.InputError):
        model.step(cache, 999)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_absorb_equals_batch(family):
    """Each new kept token: one cached with-context step plus one patched step. Its patches
    and logits equal batch absorb on the whole sequence; earlier kept tokens' patches never
    change."""
    model = model_of(family)
    tok = np.random.default_rng(4).integers(0, 256, 16)
    ctx = [1, 2, 4, 5]
    logits, stream = mp.absorb_prefill(model, tok[:8], ctx)
    first = stream.patches
    for t in tok[8:]:
        logits, _, stream = mp.absorb_step(model, stream, int(t))
    batch = mp.absorb(model, tok, ctx)
    np.testing.assert_array_equal(stream.kept, batch.kept)
    full = to_numpy(model.forward(tok))
    patched = to_numpy(mp.patched_forward(model, tok, batch))
    assert rel_err(logits, patched[-1]) <= TOL_STREAM and rel_err(logits, full[-1]) <= TOL64_MODEL
    # the streamed patches, applied in one uncached forward, give the same logits
    streamed = to_numpy(model.forward(tok[stream.kept], positions=stream.kept, patches=stream.patches))
    assert rel_err(streamed, full[stream.kept]) <= TOL64_MODEL
    # causality: the first kept tokens' patches are those of the prefill
    for lp_first, lp_all in zip(first.layers, stream.patches.layers):
        for name, p in lp_first.items():
            for f, a in vars(p).items():
                if a is not None:
                    np.testing.assert_array_equal(to_numpy(getattr(lp_all[name], f))[: a.shape[0]], to_numpy(a))
    # negative control: the unpatched model on the kept tokens
    plain = to_numpy(model.forward(tok[stream.kept], positions=stream.kept))
    assert rel_err(plain[-1], full[-1]) > CONTROL_MIN


@pytest.mark.parametrize("order", ["closed", "open"])
def test_greedy_streams_equal_uncached(order):
    """greedy with a fixed context and with 'all_but_last' equals the with-context greedy."""
    model = tiny("gemma3", seed=11, n_layers=6)
    prompt = np.random.default_rng(5).integers(0, 256, 10)
    want, want_logits = mp.greedy(model, prompt, 6)
    for ctx in (np.arange(1, 7), "all_but_last"):
        got, got_logits = mp.greedy(model, prompt, 6, context=ctx, order=order)
        np.testing.assert_array_equal(got, want)
        assert rel_err(got_logits, want_logits) <= TOL64_MODEL


def test_greedy_matches_the_uncached_loop():
    """The cached with-context greedy equals argmax of full forwards, step by step."""
    model = model_of("gpt2")
    seq = list(np.random.default_rng(6).integers(0, 256, 5))
    got, logits = mp.greedy(model, seq, 4)
    for i in range(4):
        row = to_numpy(model.forward(seq))[-1]
        assert rel_err(logits[i], row) <= TOL_CACHE
        seq.append(int(np.argmax(row)))
    np.testing.assert_array_equal(got, seq[5:])


def test_greedy_counts():
    model = model_of("llama")
    ids, logits = mp.greedy(model, [1, 2, 3], 0)
    assert ids.shape == (0,) and logits.shape == (0, 256)
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(mp.errors.InputError, match="n_new"):
            mp.greedy(model, [1, 2, 3], bad)
