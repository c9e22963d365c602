"""Any stream, any depth: vanilla blocks (M3, M4, and GPT-2's LayerNorm block) on a continuous
stream without tokens or positions, with an MLP of any depth (MATH.md M8, "MLPs of any depth").

Theorem tests with negative controls: the deep outer part's witness (M2 on the last layer at its
own input, or the bias shift), the block theorem on a stream (<= 1e-12), M7 through a stream
model (<= 1e-10). Then a peer: an independent plain-numpy vanilla M4 block of depth 4 on a
stream, reproduced exactly by minipatch, whose own patches verify-patches accepts.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import CONTROL_MIN, TOL64_BLOCK, TOL64_MODEL, rel_err
from minipatch.absorb import check_block
from minipatch.audit.verify import verify
from minipatch.config import ModelConfig, ModelConfigError
from minipatch.controllability import LinearOuter, check_output_controllable
from minipatch.deep import DeepOuter
from minipatch.errors import InputError, ShapeError
from minipatch.patches import Patches, Rank1, Shift
from minipatch.stream import absorb_stream, run_stream, stream_model

pytestmark = pytest.mark.vanilla

CASES = [(f, d) for f in ("vanilla_m3", "vanilla_m4", "gpt2") for d in (2, 3, 5)]


def stream(T=12, D=16, seed=0):
    return np.random.default_rng(seed).standard_normal((T, D))


@pytest.mark.parametrize("family, depth", CASES)
def test_block_theorem_on_a_stream(family, depth):
    model = stream_model(family, n_layers=2, mlp_depth=depth, seed=depth)
    assert model.cfg.pos_embedding == "none" and model.cfg.mlp_depth == depth
    if depth > 2:
        assert isinstance(model.spec.outer, DeepOuter) and f"mid_proj.{depth - 3}.weight" in model.params["layers"][0]
    for method in model.spec.outer.methods(model.cfg):
        r = check_block(model, 1, stream(), context=[1, 2, 3, 4], method=method)
        assert rel_err(r.patched, r.with_context) <= TOL64_BLOCK, (family, depth, method)
        assert rel_err(r.unpatched, r.with_context) > CONTROL_MIN
        assert set(r.patch) >= {"up_proj.weight"} and not any(k.startswith("mid_proj") for k in r.patch)


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("method", ["m2", "bias"])
def test_deep_outer_witness_and_its_negative_control(depth, method):
    """Output controllability of the rest of the MLP: the witness at h_(k-1); M2 at h_1 instead
    (what a depth-2 implementation would do) misses by O(1)."""
    model = stream_model("vanilla_m4", mlp_depth=depth, seed=1)
    p, cfg, outer = model.params["layers"][0], model.cfg, model.spec.outer
    rng = np.random.default_rng(2)
    h = np.abs(rng.standard_normal((5, cfg.d_ff)))
    delta = rng.standard_normal((5, cfg.d_model))
    err, patch = check_output_controllable(outer, p, cfg, h, delta, method)
    assert err <= 1e-12 * np.max(np.abs(delta))
    _, wrong = LinearOuter.witness(outer, p, h, delta, cfg, "m2")
    missed = np.max(np.abs(outer.forward(p, h, cfg, wrong) - outer.forward(p, h, cfg) - delta))
    assert missed > CONTROL_MIN


@pytest.mark.parametrize("family, depth", CASES)
def test_m7_through_a_stream_model(family, depth):
    model = stream_model(family, n_layers=3, mlp_depth=depth, seed=7)
    x = stream(T=14, seed=depth)
    res = absorb_stream(model, x, context=[2, 3, 5, 8])
    want = run_stream(model, x)[res.kept]
    got = run_stream(model, x[res.kept], res.kept, res.patches)
    assert rel_err(got, want) <= TOL64_MODEL
    assert rel_err(run_stream(model, x[res.kept], res.kept), want) > CONTROL_MIN


# --------------------------------------------------------------------------- a peer, reproduced


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def peer_block(w, x, patch=None):
    """A peer's vanilla M4 block on a stream, written independently: causal softmax attention
    without positions, z = x + attn, MLP of any depth, out = z + mlp(z). Returns (z, out)."""
    T, N = x.shape[0], w["n_heads"]
    q, k, v = (np.stack(np.split(x @ w[n].T, N, axis=1)) for n in ("wq", "wk", "wv"))    # [N, T, H]
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    z = x + np.concatenate(list(a @ v), axis=1) @ w["wo"].T
    W1 = w["mlp"][0][0]
    h = z @ W1.T + w["mlp"][0][1]
    if patch is not None:
        h = h + patch["u"] * np.sum(patch["v"] * z, -1, keepdims=True)
    h = gelu_tanh(h)
    for W, b in w["mlp"][1:-1]:
        h = gelu_tanh(h @ W.T + b)
    W, b = w["mlp"][-1]
    m = h @ W.T + b + (0 if patch is None else patch["shift"])
    return z, z + m


def peer_weights(model):
    """The peer's weights: minipatch's parameters, in the peer's own layout."""
    out = []
    for lp in model.params["layers"]:
        mids = [(lp[f"mid_proj.{j}.weight"], lp[f"mid_proj.{j}.bias"]) for j in range(model.cfg.mlp_depth - 2)]
        out.append({"n_heads": model.cfg.n_heads, "wq": lp["q_proj.weight"], "wk": lp["k_proj.weight"],
                    "wv": lp["v_proj.weight"], "wo": lp["o_proj.weight"],
                    "mlp": [(lp["up_proj.weight"], lp["up_proj.bias"]), *mids,
                            (lp["down_proj.weight"], lp["down_proj.bias"])]})
    return out


def peer_patches(weights, x, kept):
    """The peer's own construction, layer by layer on its patched stream: M1 on its first MLP
    layer (u = W1 (z^C - z), v = z / ||z||^2) and the output bias shift z^C - z."""
    ctx, xs, layers = x, x[kept], []
    for w in weights:
        zc, outc = peer_block(w, ctx)
        z, _ = peer_block(w, xs)
        d = zc[kept] - z
        patch = {"u": d @ w["mlp"][0][0].T, "v": z / np.sum(z * z, -1, keepdims=True), "shift": d}
        layers.append({"up_proj.weight": Rank1(patch["u"], patch["v"]), "down_proj.bias": Shift(d)})
        _, xs = peer_block(w, xs, patch)
        ctx = outc
    return Patches(tuple(layers), kept)


def test_a_peer_block_is_reproduced_and_its_patches_verified(tmp_path):
    model = stream_model("vanilla_m4", n_layers=3, mlp_depth=4, seed=11, act="gelu_tanh")
    weights, x = peer_weights(model), stream(T=10, seed=5)
    y = x
    for w in weights:
        y = peer_block(w, y)[1]
    assert rel_err(run_stream(model, x), y) <= 1e-14          # the same blocks, written twice
    kept = np.array([0, 4, 5, 6, 7, 8, 9])
    theirs = peer_patches(weights, x, kept)
    path = theirs.save(tmp_path / "peer.npz", context=[1, 2, 3])
    r = verify(model, x, Patches.load(path, model), [1, 2, 3])
    assert r["ok"] and r["output"] == "stream" and r["logits_max_rel_err"] <= TOL64_MODEL, r["verdict"]
    assert all(lay["verdict"] == "same as minipatch's bias" for lay in r["layers"]), r["layers"]
    assert r["unpatched_max_rel_err"] > CONTROL_MIN
    broken = Patches(tuple(dict(lp, **{"down_proj.bias": Shift(1.01 * lp["down_proj.bias"].d)})
                           for lp in theirs.layers), kept)
    r = verify(model, x, broken, [1, 2, 3])
    assert not r["ok"] and r["culprit"] == {"layer": 0, "sublayer": "mlp_out", "parameter": "down_proj.bias",
                                            "rel_diff": pytest.approx(0.01, rel=1e-6), "closest": "bias"}


# --------------------------------------------------------------------------- bad input


def test_stream_input_errors_are_named():
    model = stream_model("vanilla_m3", mlp_depth=3)
    with pytest.raises(ShapeError, match=r"needs \[T >= 1, 16\]"):
        run_stream(model, np.zeros((4, 15)))
    with pytest.raises(ShapeError, match="floating"):
        run_stream(model, np.zeros((4, 16), dtype=np.int64))
    with pytest.raises(ShapeError, match="float32, the model float64"):
        run_stream(model, np.zeros((4, 16), dtype=np.float32))
    with pytest.raises(InputError, match="NaN or inf"):
        run_stream(model, np.full((4, 16), np.nan))
    with pytest.raises(InputError, match="strictly increasing"):
        run_stream(model, stream(T=3), positions=[0, 2, 1])


@pytest.mark.parametrize("family, depth, message", [("llama", 3, "declared for"), ("vanilla_m4", 1, ">= 2"),
                                                    ("gpt2", 2.5, "integer")])
def test_mlp_depth_is_validated(family, depth, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(family=family, vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_head=4,
                    d_ff=8, mlp_depth=depth)
