"""Every block family on one spine: the block theorem per layer and through the model.

For each declared family (``minipatch.blocks.families``): the float64 theorem for each block
separately (MATH.md M8 specialised by the layout; M6 for post-norm outers, M3/M4 for the
vanilla blocks) to 1e-12, through the model (M7) to 1e-10, float32 to 1e-4, random context
sets (non-prefix included), the negative control, the rank check on materialized patches,
the MoE dense loop reference, one backend run, and the float64 erf behind exact GELU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minipatch
from minipatch.backend import to_numpy
from minipatch.blocks import attn_sublayer
from minipatch.models import tiny
from minipatch.ops import erf, gelu_erf
from minipatch.patches import Rank1, Shift
from helpers import CONTROL_MIN, TOL32, TOL64_BLOCK, TOL64_MODEL, block_checks, fam_params, moe_loop_reference, rel_err

T = 20
CONTEXT = [1, 2, 3, 5, 8, 9, 10, 13]          # not a prefix: kept tokens sit between context tokens


def tokens(seed=0, n=T):
    return np.random.default_rng(seed).integers(0, 256, n)


def assert_rank1(patch):
    """Materialize every rank-1 patch of every token (each active expert) and check its rank."""
    n = 0
    for name, p in patch.items():
        if not isinstance(p, Rank1):
            continue
        for t in range(p.n_tokens):
            d = np.asarray(to_numpy(p.dense(t)))
            mats = d if d.ndim == 3 else d[None]
            for m in mats:
                if np.any(m != 0):
                    assert np.linalg.matrix_rank(m) == 1, (name, t)
                    n += 1
    return n


@pytest.mark.parametrize("family", fam_params())
def test_block_theorem_float64_each_block(family):
    model = tiny(family, seed=1)
    rows = block_checks(model, tokens(), CONTEXT)
    for l, (err, ctrl, name, patch) in enumerate(rows):
        assert err <= TOL64_BLOCK, (family, l, name, err)
        assert ctrl >= CONTROL_MIN, (family, l, ctrl)
        if family != "vanilla_m4":              # M4 patches W1 (rank 1) and the bias (a shift)
            assert assert_rank1(patch) > 0
        else:
            assert assert_rank1(patch) > 0 and isinstance(patch["down_proj.bias"], Shift)


@pytest.mark.parametrize("family", fam_params())
def test_model_theorem_float64(family):
    model = tiny(family, seed=2)
    tok = tokens(1)
    ref = model.forward(tok)
    res = minipatch.absorb(model, tok, CONTEXT)
    got = minipatch.patched_forward(model, tok, res)
    assert rel_err(got, ref[res.kept]) <= TOL64_MODEL
    assert rel_err(model.forward(tok[res.kept], positions=res.kept), ref[res.kept]) >= CONTROL_MIN
    assert all(assert_rank1(lp) > 0 for lp in res.patches.layers)


@pytest.mark.parametrize("family", fam_params())
def test_model_theorem_float32(family):
    model64 = tiny(family, seed=3)
    model = model64.astype(np.float32)
    tok = tokens(2)
    ref = model64.forward(tok)
    res = minipatch.absorb(model, tok, CONTEXT)
    got = minipatch.patched_forward(model, tok, res)
    assert got.dtype == np.float32
    assert rel_err(got, ref[res.kept]) <= TOL32
    assert rel_err(model.forward(tok[res.kept], positions=res.kept), ref[res.kept]) >= CONTROL_MIN


@pytest.mark.m7
@pytest.mark.parametrize("family", fam_params())
@given(data=st.data())
def test_random_context_sets(family, data):
    """Sizes, seeds and context subsets (any subset, not only prefixes) drawn by hypothesis."""
    n = data.draw(st.integers(3, 16), label="T")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ctx = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True), label="context")
    model = tiny(family, seed=seed % 7, n_layers=2)
    tok = tokens(seed, n)
    res = minipatch.absorb(model, tok, ctx)
    ref = model.forward(tok)[res.kept]
    assert rel_err(minipatch.patched_forward(model, tok, res), ref) <= TOL64_MODEL


# ---- M3 and M4 as their own theorems (Dherin et al. 2025) ----------------------------------

@pytest.mark.m3
@pytest.mark.vanilla
def test_m3_vanilla_block_without_skip():
    """M3: T(C, x) = f((W + dW) A(x) + b), dW = (W dA) a^T/||a||^2: only W is patched."""
    model = tiny("vanilla_m3", seed=4)
    rows = block_checks(model, tokens(3), CONTEXT)
    for err, ctrl, name, patch in rows:
        assert set(patch) == {"up_proj.weight"} and name == "none"
        assert err <= TOL64_BLOCK and ctrl >= CONTROL_MIN
    # dW is exactly M1 on the attention outputs a = A(x), a' = A(C, x)
    tok = tokens(3)
    kept = np.setdiff1d(np.arange(T), CONTEXT)
    trace = {}
    model.run(tok, trace=trace)
    lp = model.params["layers"][0]
    a_ctx = trace["layers"][0]["a"][kept]
    tr = {}
    attn_sublayer(model.spec, lp, trace["layers"][0]["x"][kept], model.cfg, 0, kept, trace=tr)
    a = tr["a"]
    W = lp["up_proj.weight"]
    p = rows[0][3]["up_proj.weight"]
    for t in range(len(kept)):
        dW = np.outer(W @ (a_ctx[t] - a[t]), a[t]) / (a[t] @ a[t])
        np.testing.assert_allclose(p.dense(t), dW, rtol=0, atol=1e-13 * np.abs(dW).max())


@pytest.mark.m4
@pytest.mark.vanilla
def test_m4_vanilla_block_with_skip_and_bias():
    """M4: W1 patched by M1 (z -> z^C) and b2 += z^C - z."""
    model = tiny("vanilla_m4", seed=5)
    tok = tokens(4)
    kept = np.setdiff1d(np.arange(T), CONTEXT)
    trace = {}
    model.run(tok, trace=trace)
    rows = block_checks(model, tok, CONTEXT)
    for l, (err, ctrl, name, patch) in enumerate(rows):
        assert name == "bias" and set(patch) == {"up_proj.weight", "down_proj.bias"}
        assert err <= TOL64_BLOCK and ctrl >= CONTROL_MIN
    tr = {}
    lp = model.params["layers"][0]
    attn_sublayer(model.spec, lp, trace["layers"][0]["x"][kept], model.cfg, 0, kept, trace=tr)
    shift = rows[0][3]["down_proj.bias"].d
    np.testing.assert_allclose(shift, trace["layers"][0]["z"][kept] - tr["z"], rtol=0, atol=1e-14)
    res = minipatch.absorb(model, tok, CONTEXT)
    assert rel_err(minipatch.patched_forward(model, tok, res), model.forward(tok)[kept]) <= TOL64_MODEL


# ---- MoE: vectorized against a dense loop over tokens and all experts ----------------------

@pytest.mark.ops
@pytest.mark.parametrize("family", fam_params(["mixtral", "qwen2_moe"]))
def test_moe_vectorized_matches_dense_loop(family):
    model = tiny(family, seed=6)
    spec, cfg = model.spec, model.cfg
    trace = {}
    model.run(tokens(5), trace=trace)
    for l, lp in enumerate(model.params["layers"]):
        z = trace["layers"][l]["z"]
        n = spec.inner.normalize(lp, z, cfg)
        got = spec.outer.forward(lp, spec.inner.forward(lp, z, cfg), cfg)
        np.testing.assert_allclose(got, moe_loop_reference(lp, n, cfg), rtol=0, atol=1e-13)
        np.testing.assert_allclose(trace["layers"][l]["m"], got, rtol=0, atol=0)


# ---- backends ------------------------------------------------------------------------------

@pytest.mark.backend
@pytest.mark.parametrize("family", fam_params(["gemma3", "llama", "qwen2_moe", "neox"]))
def test_theorem_under_backend(family, backend):
    """The theorem with array-api-strict (CPU and its simulated second device) and CuPy."""
    xp, dev = backend
    model64 = tiny(family, seed=7, n_layers=2)
    model = model64.to(xp, dev)
    tok = tokens(6, 12)
    ctx = [2, 3, 4, 7, 8]
    res = minipatch.absorb(model, tok, ctx)
    got = minipatch.patched_forward(model, tok, res)
    ref = model64.forward(tok)[res.kept]
    assert rel_err(got, ref) <= TOL64_MODEL
    assert rel_err(model.forward(tok[res.kept], positions=res.kept), ref) >= CONTROL_MIN


# ---- exact GELU: erf with array-API ops only -----------------------------------------------

@pytest.mark.ops
def test_erf_matches_math_erf_to_a_few_ulp():
    x = np.concatenate([np.linspace(-9, 9, 36001), np.geomspace(1e-300, 1.0, 400),
                        -np.geomspace(1e-300, 1.0, 400), [0.0, 1.9999999999999998, 2.0, 30.0, 1e10]])
    ref = np.array([math.erf(v) for v in x])
    got = erf(x)
    nz = ref != 0
    assert np.max(np.abs(got[nz] - ref[nz]) / np.abs(ref[nz])) <= 1e-15
    assert np.all(got[~nz] == 0)
    assert erf(np.array([np.inf, -np.inf])).tolist() == [1.0, -1.0]
    assert np.isnan(erf(np.array([np.nan])))[0]


@pytest.mark.ops
def test_gelu_erf_matches_math_and_runs_without_numpy(backend):
    xp, dev = backend
    x = np.linspace(-8, 8, 1601)
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    got = gelu_erf(xp.asarray(x, device=dev) if dev is not None else xp.asarray(x))
    assert rel_err(got, ref) <= 1e-15
    x32 = np.linspace(-8, 8, 1601, dtype=np.float32)
    ref32 = np.array([0.5 * float(v) * (1 + math.erf(float(v) / math.sqrt(2))) for v in x32])
    assert rel_err(gelu_erf(x32), ref32) <= 1e-6 and gelu_erf(x32).dtype == np.float32
