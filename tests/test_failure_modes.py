"""When a witness does not exist (MATH.md section 7), and what the package does instead.

Dead ReLU hiddens (bias witness or a named error), zero-norm inputs, a zero post-norm
multiplier (M6b raises, M6a works), a zero coordinate of u^C (M6a raises, 'auto' picks
another construction), MoE top-k ties (stable: the lower expert index wins), the M6c hard
case in a real block, and no mutation of inputs or parameters by any family.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import minipatch
from minipatch import NotControllableError
from minipatch.config import FAMILIES
from minipatch.controllability import check_input_controllable
from minipatch.lemmas import m1
from minipatch.m6 import trust_region
from minipatch.model import Model
from minipatch.models import tiny
from helpers import CONTROL_MIN, TOL64_BLOCK, TOL64_MODEL, block_checks, fam_params, moe_loop_reference, rel_err

T = 16
CONTEXT = [0, 1, 2, 3, 6, 7]          # position 0 is context: kept[0] = 4, not row 0
KEPT = np.setdiff1d(np.arange(T), CONTEXT)


def tokens(seed=0, n=T):
    return np.random.default_rng(seed).integers(0, 256, n)


def with_layer(model, layer, **arrays):
    """A copy of ``model`` with some parameters of one layer replaced (never in place)."""
    p = dict(model.params, layers=[dict(lp) for lp in model.params["layers"]])
    p["layers"][layer].update(arrays)
    return Model(model.cfg, p)


def theorem_err(model, tok, ctx, method="auto"):
    res = minipatch.absorb(model, tok, ctx, method=method)
    return rel_err(minipatch.patched_forward(model, tok, res), model.forward(tok)[res.kept]), res


# ---- dead hiddens ---------------------------------------------------------------------------

@pytest.mark.m8
@pytest.mark.gpt2
def test_dead_relu_hidden_falls_back_to_the_bias_witness():
    """All-zero h (ReLU below a large negative bias): M2 has no witness, b += delta does."""
    base = tiny("gpt2", seed=1, act="relu")
    lp = base.params["layers"][1]
    model = with_layer(base, 1, **{"up_proj.bias": np.full_like(lp["up_proj.bias"], -1e3)})
    tr = {}
    model.forward(tokens(), trace=tr)
    assert np.all(tr["layers"][1]["h"] == 0)
    err, res = theorem_err(model, tokens(), CONTEXT)
    assert res.methods[1] == "bias" and res.methods[0] == "m2"
    assert err <= TOL64_MODEL
    with pytest.raises(NotControllableError) as e:
        minipatch.absorb(model, tokens(), CONTEXT, method="m2")
    assert e.value.layer == 1 and e.value.position == KEPT[0] and e.value.value == 0.0
    assert "h" in e.value.quantity


@pytest.mark.m8
@pytest.mark.llama
def test_dead_hidden_without_bias_names_layer_position_quantity():
    base = tiny("llama", seed=2, act="relu")
    lp = base.params["layers"][2]
    model = with_layer(base, 2, **{"gate_proj.weight": np.zeros_like(lp["gate_proj.weight"])})
    with pytest.raises(NotControllableError) as e:
        minipatch.absorb(model, tokens(), CONTEXT)
    err = e.value
    assert (err.layer, err.position, err.value) == (2, KEPT[0], 0.0)
    assert "||h" in err.quantity
    assert "layer 2" in str(err) and f"token position {KEPT[0]}" in str(err)
    assert isinstance(err, ValueError)


@pytest.mark.m1
@pytest.mark.m8
def test_zero_norm_inputs_raise():
    w = np.random.default_rng(0).standard_normal((5, 4))
    a = np.ones((3, 4))
    a[1] = 0
    with pytest.raises(NotControllableError) as e:
        m1(w, a, a + 1)
    assert e.value.position == 1 and e.value.value == 0.0
    # an RMS pre-norm maps z = 0 to n = 0: the inner witness has nothing to divide by
    model = tiny("llama", seed=3)
    z = np.random.default_rng(1).standard_normal((4, model.cfg.d_model))
    z[2] = 0
    with pytest.raises(NotControllableError) as e:
        check_input_controllable(model.spec.inner, model.params["layers"][0], model.cfg, z, z + 1)
    assert e.value.position == 2 and "n" in e.value.quantity
    # underflow counts as zero, never NaN
    with pytest.raises(NotControllableError):
        m1(w, np.full((1, 4), 1e-200), np.ones((1, 4)))


# ---- post-norm (M6) preconditions ----------------------------------------------------------

@pytest.mark.m6
@pytest.mark.gemma
def test_zero_post_norm_multiplier_m6b_raises_m6a_works():
    base = tiny("gemma3", seed=4)
    g = base.params["layers"][1]["mlp_post_norm.weight"].copy()
    g[5] = -1.0                                   # 1 + g = 0 at coordinate 5
    model = with_layer(base, 1, **{"mlp_post_norm.weight": g})
    with pytest.raises(NotControllableError) as e:
        minipatch.absorb(model, tokens(), CONTEXT, method="m6b")
    assert e.value.layer == 1 and e.value.position == KEPT[0] and e.value.value == 0.0
    err, res = theorem_err(model, tokens(), CONTEXT, "m6a")
    assert err <= TOL64_MODEL
    err, res = theorem_err(model, tokens(), CONTEXT, "auto")
    assert err <= TOL64_MODEL and res.methods[1] != "m6b"


@pytest.mark.m6
@pytest.mark.gemma
def test_exact_zero_coordinate_of_u_ctx_m6a_raises_auto_chooses_another():
    """A zero row of W_down makes m^C, hence u^C, exactly 0 at that coordinate for every
    token: M6a (which divides by u^C) has no witness; 'auto' uses another construction."""
    base = tiny("gemma3", seed=5)
    w = base.params["layers"][2]["down_proj.weight"].copy()
    w[7] = 0.0
    model = with_layer(base, 2, **{"down_proj.weight": w})
    tr = {}
    model.forward(tokens(), trace=tr)
    assert np.all(tr["layers"][2]["m"][:, 7] == 0)
    with pytest.raises(NotControllableError) as e:
        minipatch.absorb(model, tokens(), CONTEXT, method="m6a")
    assert e.value.layer == 2 and "u^C" in e.value.quantity and e.value.position == KEPT[0]
    for method in ("auto", "m6b", "m6c"):
        err, res = theorem_err(model, tokens(), CONTEXT, method)
        assert err <= TOL64_MODEL, method
        assert res.methods[2] != "m6a"


@pytest.mark.m6
@pytest.mark.gemma
def test_m6c_hard_case_in_a_real_block():
    """t has no component on the coordinate of smallest s^2 (MATH.md M6c hard case).

    Last layer of a Gemma model, one kept token: attn_post_norm multiplier 0 at coordinate 0
    (so delta_0 = y^C_0 - y_0 = 0 exactly), W_down row 0 zero (so u^C_0 = 0 exactly), post-norm
    multiplier s_0 = 0.1 the unique smallest. Then t_0 = s_0 u^C_0 + delta_0 = 0, and with a
    small W_down (rms(m^C)^2 ~ eps, so mean(u^2) ~ 1/2) the secular equation has no root.
    """
    base = tiny("gemma3", seed=6)
    L = base.cfg.n_layers
    lp = base.params["layers"][L - 1]
    g_pa = lp["attn_post_norm.weight"].copy()
    g_pa[0] = -1.0
    wd = 1e-3 * lp["down_proj.weight"]
    wd[0] = 0.0
    s = np.full(base.cfg.d_model, 50.0)
    s[0] = 0.1
    model = with_layer(base, L - 1, **{"attn_post_norm.weight": g_pa, "down_proj.weight": wd,
                                       "mlp_post_norm.weight": s - 1.0})
    tok = tokens(7)
    ctx = list(range(T - 1))
    rows = block_checks(model, tok, ctx, method="m6c")
    err, ctrl, name, patch = rows[L - 1]
    assert name == "m6c" and err <= TOL64_BLOCK and ctrl >= CONTROL_MIN
    # the trust-region subproblem really is in the hard case, and its solution is feasible
    tr = {}
    model.forward(tok, trace=tr)
    from minipatch.blocks import attn_sublayer
    from minipatch.ops import rms_unit

    K = np.array([T - 1])
    t_noctx = {}
    attn_sublayer(model.spec, model.params["layers"][L - 1], tr["layers"][L - 1]["x"][K], model.cfg, L - 1, K,
                  trace=t_noctx)
    delta = tr["layers"][L - 1]["z"][K] - t_noctx["z"]
    m_ctx = tr["layers"][L - 1]["h"][K] @ wd.T
    t = s * rms_unit(m_ctx, model.cfg.norm_eps) + delta
    assert t[0, 0] == 0.0 and delta[0, 0] == 0.0
    c = (t * s) ** 2
    phi_at_min = np.sum(c[:, 1:] / (s[1:] ** 2 - s[0] ** 2) ** 2) / s.size
    assert phi_at_min < 1                       # no root below min s^2: the hard case
    y = trust_region(s, t)
    np.testing.assert_allclose(np.mean(y ** 2), 1.0, rtol=0, atol=1e-14)
    assert y[0, 0] != 0                          # the free coordinate is filled
    np.testing.assert_allclose(y[0, 1:], s[1:] * t[0, 1:] / (s[1:] ** 2 - s[0] ** 2), rtol=1e-13)
    # optimal among feasible points: never worse than random points on mean(y^2) = 1
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((2000, s.size)) * 0.05 + y
    cand /= np.sqrt(np.mean(cand ** 2, axis=1, keepdims=True))
    obj = np.sum((s * cand - t) ** 2, axis=1)
    assert np.sum((s * y - t) ** 2) <= obj.min() + 1e-9
    # the whole model still obeys the theorem
    err, res = theorem_err(model, tok, ctx, "m6c")
    assert err <= TOL64_MODEL


# ---- MoE ties ------------------------------------------------------------------------------

@pytest.mark.moe
@pytest.mark.m8
def test_moe_topk_ties_lower_expert_index_wins():
    """Exact ties in the router probabilities: a stable sort, so the lower expert index wins
    (torch.topk leaves the order of ties unspecified; the HF fixtures contain no ties)."""
    base = tiny("mixtral", seed=8)
    lp = base.params["layers"][0]
    model = with_layer(base, 0, **{"router.weight": np.zeros_like(lp["router.weight"])})
    tr = {}
    model.forward(tokens(), trace=tr)
    gates = tr["layers"][0]["h"]["gates"]
    k = model.cfg.top_k
    assert np.all(gates[:, :k] == 1.0 / k) and np.all(gates[:, k:] == 0)
    n = model.spec.inner.normalize(model.params["layers"][0], tr["layers"][0]["z"], model.cfg)
    np.testing.assert_allclose(tr["layers"][0]["m"], moe_loop_reference(model.params["layers"][0], n, model.cfg),
                               rtol=0, atol=1e-13)
    # ties between pairs: experts (0, 2) share one router row, (1, 3) its negative; top-1
    w = np.random.default_rng(1).standard_normal(model.cfg.d_model)
    router = np.stack([w, -w, w, -w])
    m1_ = with_layer(base, 0, **{"router.weight": router})
    m1_ = Model(m1_.cfg.replace(top_k=1), m1_.params)
    tr = {}
    m1_.forward(tokens(), trace=tr)
    n = m1_.spec.inner.normalize(m1_.params["layers"][0], tr["layers"][0]["z"], m1_.cfg)
    chosen = np.argmax(tr["layers"][0]["h"]["gates"], axis=-1)
    np.testing.assert_array_equal(chosen, np.where(n @ w > 0, 0, 1))
    # the theorem holds through ties: M1 on the router keeps the logits, hence the ties
    for model_ in (model, m1_):
        err, _ = theorem_err(model_, tokens(), CONTEXT)
        assert err <= TOL64_MODEL


# ---- no mutation ---------------------------------------------------------------------------

def _freeze(tree):
    if isinstance(tree, dict):
        return {k: _freeze(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_freeze(v) for v in tree]
    a = np.array(tree, copy=True)
    a.flags.writeable = False
    return a


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", fam_params(FAMILIES))
def test_no_input_or_parameter_is_mutated(family):
    """Every parameter, the tokens and the context are read-only during forward, absorb,
    the patched forward and greedy decoding (a write would raise), and unchanged after."""
    base = tiny(family, seed=9, n_layers=2)
    params = _freeze(base.params)
    before = copy.deepcopy(base.params)
    model = Model(base.cfg, params)
    tok = _freeze(tokens(9, 10))
    ctx = _freeze(np.array([1, 2, 5]))
    model.forward(tok, trace={})
    res = minipatch.absorb(model, tok, ctx)
    minipatch.patched_forward(model, tok, res)
    minipatch.greedy(model, tok, 1, context=ctx)
    _assert_same(model.params, before)
    np.testing.assert_array_equal(tok, tokens(9, 10))
    np.testing.assert_array_equal(ctx, [1, 2, 5])
