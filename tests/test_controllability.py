"""The controllability framework as executable definitions (MATH.md section 5, M8).

Input-controllable inner part f: for z != 0 and any z' there is theta' with f_theta'(z) = f(z').
Output-controllable outer part g: for h (!= 0) and any delta there is phi' with
g_phi'(h) = g(h) + delta. Each row of MATH.md's witness table is checked here with
``check_input_controllable`` / ``check_output_controllable`` on random inputs, with a
negative control, and M8 composes them: z + g'(f'(z)) = z^C + g(f(z^C)).
"""
from __future__ import annotations

import numpy as np
import pytest

from minipatch.controllability import (BiasOuter, GatedInner, IdentityActInner, LinearInner, LinearOuter,
                                       RMSPostNormOuter, check_input_controllable, check_output_controllable, m8,
                                       max_abs_diff)
from minipatch.experts import MoEInner, MoEOuter
from minipatch.models import tiny
from minipatch.patches import Rank1
from helpers import rel_err

pytestmark = pytest.mark.m8

D, T = 64, 7


def layer(family, **kw):
    m = tiny(family, seed=11, **kw)
    return m.params["layers"][1], m.cfg, m.spec


def rand(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape)


def scale_of(x):
    if isinstance(x, dict):
        return max(float(np.max(np.abs(x["gates"]))), float(np.max(np.abs(x["experts"]))))
    return float(np.max(np.abs(x)))


# row of the witness table -> (family providing parameters, inner part)
INNER_ROWS = {
    "linear z W^T + b (no norm, identity act)": ("vanilla_m4", lambda s: IdentityActInner(None, act="relu")),
    "linear + ReLU (vanilla)": ("vanilla_m3", lambda s: s.inner),
    "LayerNorm -> linear, GELU (GPT-2)": ("gpt2", lambda s: s.inner),
    "RMSNorm(1+g) -> GeGLU (Gemma)": ("gemma3", lambda s: s.inner),
    "RMSNorm -> SwiGLU (Llama)": ("llama", lambda s: s.inner),
    "RMSNorm -> ReGLU": ("llama", lambda s: GatedInner("mlp_norm", act="relu")),
    "SwiGLU without pre-norm (OLMo 2)": ("olmo2", lambda s: s.inner),
    "shared LayerNorm -> linear (GPT-J)": ("gptj", lambda s: s.inner),
    "MoE router + experts (Mixtral)": ("mixtral", lambda s: s.inner),
    "MoE + shared expert (Qwen2-MoE)": ("qwen2_moe", lambda s: s.inner),
}


@pytest.mark.parametrize("row", list(INNER_ROWS))
def test_inner_part_is_input_controllable(row):
    family, make = INNER_ROWS[row]
    p, cfg, spec = layer(family)
    inner = make(spec)
    z, z_target = rand(1, (T, D)), 3.0 * rand(2, (T, D))
    err, patch = check_input_controllable(inner, p, cfg, z, z_target)
    target = inner.forward(p, z_target, cfg)
    assert err <= 1e-12 * scale_of(target), (row, err)
    assert set(patch) == {w + ".weight" for w in inner.reads(p)}
    # negative control: without the witness f(z) is far from f(z')
    assert max_abs_diff(inner.forward(p, z, cfg), target) >= 1e-3 * scale_of(target)


def test_moe_inner_witness_keeps_topk_and_gates():
    """M1 on the router gives the same logits, hence the same top-k and gate weights."""
    p, cfg, spec = layer("qwen2_moe")
    z, z_target = rand(3, (T, D)), rand(4, (T, D))
    h_target = spec.inner.forward(p, z_target, cfg)
    _, patch = check_input_controllable(spec.inner, p, cfg, z, z_target)
    h = spec.inner.forward(p, z, cfg, patch)
    np.testing.assert_array_equal(h["gates"] != 0, h_target["gates"] != 0)
    np.testing.assert_allclose(h["gates"], h_target["gates"], rtol=0, atol=1e-15)
    # the M8 witness patches only the experts a token selects
    u = patch["experts.gate_proj.weight"].u                         # [T, E, F]
    assert np.all((np.abs(u).sum(-1) != 0) == (h_target["gates"] != 0))


# row -> (family, outer part, method)
OUTER_ROWS = {
    "linear outer h W^T: M2 on W (Llama)": ("llama", None, "m2"),
    "linear outer with bias: b += delta (GPT-2)": ("gpt2", None, "bias"),
    "linear outer with bias: M2 on W (GPT-2)": ("gpt2", None, "m2"),
    "output bias (vanilla M4)": ("vanilla_m4", None, "bias"),
    "post-norm RMSNorm(1+g): M6a (Gemma)": ("gemma3", None, "m6a"),
    "post-norm RMSNorm(1+g): M6b (Gemma)": ("gemma3", None, "m6b"),
    "post-norm RMSNorm(1+g): M6c (Gemma)": ("gemma3", None, "m6c"),
    "post-norm RMSNorm(g): M6a (OLMo 2)": ("olmo2", None, "m6a"),
    "post-norm RMSNorm(g): M6b (OLMo 2)": ("olmo2", None, "m6b"),
    "post-norm RMSNorm(g): M6c (OLMo 2)": ("olmo2", None, "m6c"),
    "MoE outer, one expert, delta / w_e (Mixtral)": ("mixtral", None, "one"),
    "MoE outer, all active, delta / S (Mixtral)": ("mixtral", None, "all"),
    "MoE outer, one expert, delta / w_e (Qwen2-MoE)": ("qwen2_moe", None, "one"),
    "MoE outer, all active, delta / S (Qwen2-MoE)": ("qwen2_moe", None, "all"),
}


@pytest.mark.parametrize("row", list(OUTER_ROWS))
def test_outer_part_is_output_controllable(row):
    family, _, method = OUTER_ROWS[row]
    p, cfg, spec = layer(family)
    h = spec.inner.forward(p, rand(5, (T, D)), cfg)
    delta = rand(6, (T, D))
    err, patch = check_output_controllable(spec.outer, p, cfg, h, delta, method)
    base = spec.outer.forward(p, h, cfg)
    assert err <= 1e-12 * max(scale_of(base), scale_of(delta)), (row, err)
    assert patch
    for r in patch.values():
        if isinstance(r, Rank1):
            t0 = np.asarray(r.dense(0))
            for mat in (t0 if t0.ndim == 3 else t0[None]):
                if np.any(mat):
                    assert np.linalg.matrix_rank(mat) == 1


def test_moe_realised_gate_sum():
    """S = sum of the active gates: 1 after Mixtral's renormalisation, < 1 for Qwen2-MoE
    (norm_topk_prob False). The 'all' witness divides by the realised S; assuming S = 1 fails."""
    for family, renorm in (("mixtral", True), ("qwen2_moe", False)):
        p, cfg, spec = layer(family)
        h = spec.inner.forward(p, rand(7, (T, D)), cfg)
        S = h["gates"].sum(-1)
        if renorm:
            np.testing.assert_allclose(S, 1.0, rtol=0, atol=1e-15)
        else:
            assert np.all(S < 1 - 1e-3) and np.all(S > 0), S
        delta = rand(8, (T, D))
        _, patch = spec.outer.witness(p, h, delta, cfg, "all")
        err, _ = check_output_controllable(spec.outer, p, cfg, h, delta, "all")
        assert err <= 1e-12 * scale_of(delta)
        # negative control: delta instead of delta / S on every active expert
        r = patch["experts.down_proj.weight"]
        naive = Rank1(r.u * S[:, None, None], r.v)
        off = spec.outer.forward(p, h, cfg, {"experts.down_proj.weight": naive}) - (spec.outer.forward(p, h, cfg) + delta)
        if renorm:
            assert np.max(np.abs(off)) <= 1e-12 * scale_of(delta)
        else:
            np.testing.assert_allclose(off, (S[:, None] - 1) * delta, rtol=1e-9, atol=1e-12)
            assert np.max(np.abs(off)) >= 1e-2


def test_moe_one_patches_only_the_highest_gate_expert():
    p, cfg, spec = layer("qwen2_moe")
    h = spec.inner.forward(p, rand(9, (T, D)), cfg)
    _, patch = spec.outer.witness(p, h, rand(10, (T, D)), cfg, "one")
    u = patch["experts.down_proj.weight"].u
    on = np.abs(u).sum(-1) != 0                                     # [T, E]
    assert np.all(on.sum(-1) == 1)
    np.testing.assert_array_equal(np.argmax(on, -1), np.argmax(h["gates"], -1))


def test_bias_outer_needs_no_condition():
    """The bias witness works even for h = 0, where M2 has none."""
    p, cfg, spec = layer("vanilla_m4")
    h = np.zeros((T, cfg.d_ff))
    err, _ = check_output_controllable(BiasOuter(), p, cfg, h, rand(11, (T, D)))
    assert err <= 1e-14
    err, patch = check_output_controllable(LinearOuter(), p, cfg, h, rand(11, (T, D)), "auto")
    assert err <= 1e-14 and "down_proj.bias" in patch


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2", "olmo2", "mixtral", "qwen2_moe", "vanilla_m4"])
def test_m8_composes_the_two_witnesses(family):
    """M8 for arbitrary z and z^C: z + g'(f'(z)) = z^C + g(f(z^C))."""
    p, cfg, spec = layer(family)
    inner, outer = spec.inner, spec.outer
    z, z_ctx = rand(12, (T, D)), rand(13, (T, D))
    h_ctx = inner.forward(p, z_ctx, cfg)
    name, patch = m8(inner, outer, p, cfg, z, z_ctx, h_ctx, z_ctx - z)
    got = z + outer.forward(p, inner.forward(p, z, cfg, patch), cfg, patch)
    want = z_ctx + outer.forward(p, h_ctx, cfg)
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want)), name
    plain = z + outer.forward(p, inner.forward(p, z, cfg), cfg)
    assert np.max(np.abs(plain - want)) >= 1e-2


def test_parallel_block_needs_no_inner_patch():
    """Parallel layout: the MLP input x does not see the context, M8 with z_ctx=None gives
    only the outer witness, delta = Attn^C - Attn."""
    p, cfg, spec = layer("neox")
    h = spec.inner.forward(p, rand(14, (T, D)), cfg)
    name, patch = m8(spec.inner, spec.outer, p, cfg, None, None, h, rand(15, (T, D)))
    assert name == "m2" and set(patch) == {"down_proj.weight"}


def test_identity_inner_and_linear_inner_agree_on_linear_reads():
    p, cfg, _ = layer("vanilla_m4")
    z = rand(16, (T, D))
    lin = LinearInner(None, act="relu").forward(p, z, cfg)
    ident = IdentityActInner(None, act="relu").forward(p, z, cfg)
    np.testing.assert_array_equal(lin, np.maximum(ident, 0))


@pytest.mark.parametrize("name", ["gemma3_text", "olmo2"])
def test_post_norm_outer_reads_its_own_scale_convention(name):
    """Gemma multiplies by 1 + g, OLMo 2 by g: the M6 witnesses use the realised multiplier.

    Checked against Hugging Face, not against our own forward: the patched model without
    context must give the true-float64 transformers logits with context at the kept positions
    (tests/fixtures/<name>/reference.npz); the other convention is a negative control."""
    import minipatch

    from helpers import fixture, load_npz

    ref = load_npz(fixture(name) / "reference.npz")
    tok, ctx = ref["input_ids"], ref["context_positions"]
    model = minipatch.load(fixture(name), dtype="float64")
    assert isinstance(model.spec.outer, RMSPostNormOuter)
    for method in ("m6a", "m6b", "m6c", "m6d"):
        res = minipatch.absorb(model, tok, ctx, method=method)
        got = minipatch.patched_forward(model, tok, res)
        assert rel_err(got, ref["logits"][res.kept]) <= 1e-12, method
    flipped = minipatch.Model(model.cfg.replace(norm_offset=1.0 - model.cfg.norm_offset), model.params)
    res = minipatch.absorb(flipped, tok, ctx)
    assert rel_err(minipatch.patched_forward(flipped, tok, res), ref["logits"][res.kept]) > 1e-2


def test_moe_parts():
    assert isinstance(layer("mixtral")[2].outer, MoEOuter) and isinstance(layer("mixtral")[2].inner, MoEInner)
