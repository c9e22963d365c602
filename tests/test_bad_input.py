"""Bad input gets a clear, named error, never a NaN or a silently wrong answer."""
import numpy as np
import pytest

import minipatch as mp
from minipatch import InputError, NotControllableError, ShapeError
from minipatch.patches import Patches

pytestmark = [pytest.mark.m7]


@pytest.fixture(scope="module")
def model():
    return mp.models.tiny_gemma(seed=0, n_layers=2)


@pytest.mark.parametrize("tokens,err", [
    ([], InputError),
    (np.zeros((2, 3), dtype=int), ShapeError),
    (np.array([1.0, 2.0]), ShapeError),
    ([1, 2, 256], InputError),
    ([1, -1, 2], InputError),
])
def test_bad_tokens(model, tokens, err):
    with pytest.raises(err):
        model.forward(tokens)
    with pytest.raises(err):
        mp.absorb(model, tokens, [0])


@pytest.mark.parametrize("positions,err", [
    ([0, 1], ShapeError),                # wrong length
    ([0, 2, 1], InputError),             # not increasing
    ([0, 0, 1], InputError),             # duplicate
    ([-1, 0, 1], InputError),            # negative
    (np.array([0.0, 1.0, 2.0]), ShapeError),
])
def test_bad_positions(model, positions, err):
    with pytest.raises(err):
        model.forward([1, 2, 3], positions=positions)


@pytest.mark.parametrize("context,err", [
    ([], InputError),                    # empty context
    ([0, 1, 2, 3], InputError),          # covers every position
    ([1, 4], InputError),                # out of range
    ([1, 1], InputError),                # duplicate
    ([[1]], ShapeError),
])
def test_bad_context(model, context, err):
    with pytest.raises(err):
        mp.absorb(model, [5, 6, 7, 8], context)


def test_patches_for_other_positions_or_lengths(model):
    tok = np.array([5, 6, 7, 8, 9])
    res = mp.absorb(model, tok, [1, 2])
    with pytest.raises(ShapeError):      # patches for 3 tokens, input of 2
        model.forward(tok[:2], positions=[0, 3], patches=res.patches)
    with pytest.raises(InputError, match="made for positions"):
        model.forward(tok[res.kept], positions=[0, 4, 5], patches=res.patches)
    with pytest.raises(ShapeError, match="layers"):
        model.forward(tok[res.kept], positions=res.kept, patches=Patches(res.patches.layers[:1], res.kept))


def test_zero_norm_activation_names_layer_token_quantity():
    """A zero MLP input at a kept token (here: every pre-FFW norm scale 1 + g = 0 in layer 1)."""
    model = mp.models.tiny_gemma(seed=0, n_layers=2)
    params = dict(model.params)
    params["layers"] = [dict(lp) for lp in model.params["layers"]]
    params["layers"][1]["mlp_norm.weight"] = -np.ones(64)     # multiplier 1 + g = 0
    broken = mp.Model(model.cfg, params)
    with pytest.raises(NotControllableError) as e:
        mp.absorb(broken, [5, 6, 7, 8, 9], [1, 2])
    err = e.value
    assert err.layer == 1 and err.position == 0 and "||n||^2" in err.quantity and err.value == 0.0
    assert "layer 1" in str(err) and "token position 0" in str(err)
    assert isinstance(err, ValueError)
    # the original model is untouched
    assert not np.any(model.params["layers"][1]["mlp_norm.weight"] == -1)


def test_bad_configs_and_params():
    with pytest.raises(ShapeError):
        mp.models.gemma_config(n_heads=3, n_kv_heads=2)
    with pytest.raises(ShapeError):
        mp.ModelConfig(family="nope", vocab_size=1, d_model=1, n_layers=1, n_heads=1, n_kv_heads=1,
                       d_head=2, d_ff=1)
    m = mp.models.tiny_gemma(seed=0, n_layers=1)
    p = dict(m.params, layers=[dict(m.params["layers"][0])])
    p["layers"][0]["q_proj.weight"] = p["layers"][0]["q_proj.weight"][:, :5]
    with pytest.raises(ShapeError, match="q_proj"):
        mp.Model(m.cfg, p)
    del p["layers"][0]["q_proj.weight"]
    with pytest.raises(ShapeError, match="missing"):
        mp.Model(m.cfg, p)
    with pytest.raises(InputError, match="int32"):
        m.astype("int32")


def test_no_nan_from_unpatched_degenerate_inputs(model):
    """A single-token input and a one-token context are handled, not NaN."""
    lg = model.forward([3])
    assert np.all(np.isfinite(lg))
    res = mp.absorb(model, [3, 4], [0])
    assert res.kept.tolist() == [1]
    assert np.all(np.isfinite(mp.patched_forward(model, [3, 4], res)))
