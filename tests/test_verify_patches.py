"""``python -m minipatch verify-patches``: another implementation's patches, checked (M7, M8).

Patch sets stand in for other implementations: minipatch's own (every family: exact, "same"),
valid but different constructions (M6a where auto picks M6d, MoE 'all', a bias instead of M2, a
mixed MoE expert split, an M1 patch that is not the minimum-norm one: exact, "different valid
construction"), and flawed ones (float32 activations, M6a without the norm's eps, two layers
swapped: "wrong", naming the layer, the sublayer and the parameter). Plus the rank check, the
negative control that can fail, and every bad input as exit status 2.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import minipatch as mp
from helpers import FIXTURES, load_npz
from minipatch.__main__ import main
from minipatch.audit.verify import verify
from minipatch.audit.flaws import FLAWS, mixed_expert_split
from minipatch.cli.verify_patches import KEYS
from minipatch.patchfile import cast_patches as cast
from minipatch.patches import Dense, Patches, Rank1

pytestmark = pytest.mark.audit

FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "model.safetensors").exists())


def setup(name):
    model = mp.load(FIXTURES / name)
    ref = load_npz(FIXTURES / name / "reference.npz")
    return model, ref["input_ids"], ref["context_positions"]


def unbound(patches, layers=None):
    """Patches as another implementation would write them: no origin (not bound to a model)."""
    return Patches(tuple(layers if layers is not None else patches.layers), patches.positions)


def cli(capsys, *argv):
    rc = main(["verify-patches", *map(str, argv), "--json"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", FAMILIES)
def test_minipatch_patches_verify_as_the_same_construction(name):
    model, ids, ctx = setup(name)
    res = mp.absorb(model, ids, ctx)
    r = verify(model, ids, unbound(res.patches), ctx)
    assert r["ok"] and r["verdict"] == "exact; the same construction as minipatch", r["verdict"]
    assert r["logits_max_rel_err"] <= 1e-12 and r["unpatched_max_rel_err"] > 1e-3
    assert r["first_divergent_sublayer"] is None and r["culprit"] is None and r["max_rank"] == 1
    assert all(lay["verdict"].startswith("same as minipatch's") for lay in r["layers"])
    assert [lay["construction"] for lay in r["layers"]] == list(res.methods)
    assert "mlp_hidden" in r["sublayer_rel_errs"] or name in ("mixtral", "qwen2_moe")


@pytest.mark.parametrize("name, method, auto", [("gemma3_text", "m6a", "m6d"), ("gemma3_text", "m6c", "m6d"),
                                                ("mixtral", "all", "moe-one"), ("gpt2", "bias", "m2")])
def test_another_named_construction_is_a_different_valid_one(name, method, auto):
    model, ids, ctx = setup(name)
    res = mp.absorb(model, ids, ctx, method=method)
    r = verify(model, ids, unbound(res.patches), ctx)
    assert r["ok"] and "a different valid construction at layers" in r["verdict"]
    assert f"where minipatch's auto picks {auto}" in r["verdict"], r["verdict"]
    for lay in r["layers"]:
        assert lay["construction"] == res.methods[lay["layer"]] and lay["minipatch"] == auto


def test_mixed_expert_split_matches_none_but_is_exact():
    """Half the delta through the top expert, half spread over all active ones: exact, none of
    minipatch's MoE constructions (the outer witness is not unique)."""
    model, ids, ctx = setup("mixtral")
    r = verify(model, ids, mixed_expert_split(model, ids, ctx), ctx)
    assert r["ok"], r["verdict"]
    for lay in r["layers"]:
        assert lay["construction"] is None and "none of minipatch's: experts.down_proj.weight" in lay["verdict"]
        assert "the outer witness is not unique" in lay["verdict"]


def test_m1_beyond_the_minimum_norm_is_exact_but_named():
    """v + w with w orthogonal to the MLP input: the same hidden, a larger patch than M1's."""
    model, ids, ctx = setup("llama")
    res = mp.absorb(model, ids, ctx)
    tr = {}
    model.run(ids[res.kept], positions=res.kept, patches=res.patches, trace=tr)
    rng = np.random.default_rng(0)
    layers = []
    for l, lp in enumerate(res.patches.layers):
        n = model.spec.inner.normalize(model.params["layers"][l], tr["layers"][l]["z"], model.cfg)
        w = rng.standard_normal(n.shape)
        w -= np.sum(w * n, -1, keepdims=True) / np.sum(n * n, -1, keepdims=True) * n
        p = lp["gate_proj.weight"]
        layers.append(dict(lp, **{"gate_proj.weight": Rank1(p.u, p.v + 0.1 * w)}))
    r = verify(model, ids, unbound(res.patches, layers), ctx)
    assert r["ok"] and r["layers"][0]["verdict"].startswith("a different valid construction, none of minipatch's")
    assert "gate_proj.weight" in r["layers"][0]["verdict"] and "not the minimum-norm M1 patch" in r["layers"][0]["verdict"]


# --------------------------------------------------------------------------- flawed patch sets


def flawed(model, ids, ctx, how):
    """A patch set with one deliberate flaw (minipatch/audit/flaws.py; notebook 10)."""
    return FLAWS[how](model, ids, ctx)


@pytest.mark.parametrize("how, layer, sublayer, params", [
    ("float32 activations", 0, "mlp_hidden", ("gate_proj.weight", "up_proj.weight")),
    ("M6a without eps", 0, "mlp_post_norm", ("mlp_post_norm.weight",)),
    ("swapped layers", 1, "mlp_hidden", ("gate_proj.weight", "up_proj.weight"))])
def test_flawed_patch_sets_name_layer_sublayer_and_parameter(how, layer, sublayer, params):
    model, ids, ctx = setup("gemma3_text")
    r = verify(model, ids, flawed(model, ids, ctx, how), ctx)
    assert not r["ok"] and r["first_divergent_sublayer"] == {"layer": layer, "sublayer": sublayer}
    c = r["culprit"]
    assert c["layer"] == layer and c["sublayer"] == sublayer and c["parameter"] in params, c
    assert r["verdict"] == f"wrong: the patched run diverges at layer {layer} sublayer {sublayer}, parameter {c['parameter']}"
    assert r["sublayer_rel_err"] > 1e-9 and r["sublayer_rel_err_before"] <= 1e-12   # exact just before
    assert all(lay["verdict"].startswith("same") for lay in r["layers"][:layer])
    assert all(lay["verdict"].startswith("not judged") for lay in r["layers"][layer + 1:])


def test_rank_two_delta_is_exact_but_not_the_theorems_form():
    """A dense down-projection delta with an extra rank-1 term orthogonal to the hidden: exact
    output, rank 2, so not ok."""
    model, ids, ctx = setup("llama")
    res = mp.absorb(model, ids, ctx)
    tr = {}
    model.run(ids, trace=tr, head=False)
    rng = np.random.default_rng(1)
    layers = []
    for l, lp in enumerate(res.patches.layers):
        h = tr["layers"][l]["h"][res.kept]
        w = rng.standard_normal(h.shape)
        w -= np.sum(w * h, -1, keepdims=True) / np.sum(h * h, -1, keepdims=True) * h
        p = lp["down_proj.weight"]
        extra = rng.standard_normal(p.u.shape)[:, :, None] * w[:, None, :]
        dense = p.u[:, :, None] * p.v[:, None, :] + extra
        layers.append(dict(lp, **{"down_proj.weight": Dense(dense)}))
    r = verify(model, ids, unbound(res.patches, layers), ctx)
    assert r["logits_max_rel_err"] <= 1e-12 and r["max_rank"] == 2 and not r["rank_ok"] and not r["ok"]
    assert "rank 2" in r["verdict"]


def test_a_context_without_effect_cannot_pass():
    """Context after every kept token changes nothing (causal attention): the patches are exact,
    but so is the unpatched run, so the verification could not have failed: not ok."""
    model, ids, _ = setup("gemma3_text")
    ctx = np.arange(20, 24)
    res = mp.absorb(model, ids, ctx)
    r = verify(model, ids, unbound(res.patches), ctx)
    assert r["logits_max_rel_err"] <= 1e-12 and r["unpatched_max_rel_err"] <= 1e-15
    assert not r["control_ok"] and not r["ok"] and "the check cannot fail" in r["verdict"]


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    model, ids, ctx = setup("gemma3_text")
    d = tmp_path_factory.mktemp("v")
    res = mp.absorb(model, ids, ctx, method="m6a")
    good = unbound(res.patches).save(d / "good.npz", context=ctx, input_ids=ids)
    bad = flawed(model, ids, ctx, "M6a without eps").save(d / "noeps.npz", context=ctx, input_ids=ids)
    f32 = cast(unbound(mp.absorb(model, ids, ctx).patches), np.float32).save(d / "f32.npz", context=ctx)
    return d, good, bad, f32, ids


def test_cli_exit_codes_json_and_text(files, capsys):
    d, good, bad, f32, ids = files
    folder = FIXTURES / "gemma3_text"
    rc, r = cli(capsys, folder, good)
    assert rc == 0 and set(r) == set(KEYS) and r["ok"] and "m6a where minipatch's auto picks m6d" in r["verdict"]
    rc, r = cli(capsys, folder, bad)
    assert rc == 1 and r["culprit"]["parameter"] == "mlp_post_norm.weight"
    rc = main(["verify-patches", str(folder), str(bad)])
    text = capsys.readouterr().out
    assert rc == 1 and "first divergent sublayer: layer 0 mlp_post_norm (the post-MLP norm)" in text
    assert "layer 0: wrong: diverges at mlp_post_norm; parameter mlp_post_norm.weight" in text and "NOT OK" in text
    ids_arg = ",".join(map(str, ids))
    rc, r = cli(capsys, folder, f32, "--tokens", ids_arg, "--rtol", "1e-5")
    assert rc == 0 and r["notes"] == ["the patches are float32; cast to the model's float64"]


def _hostile(path, name):
    """Append a valid .npy member under a path-like name (never extracted, only refused)."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(3))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(name, buf.getvalue())
    return path


@pytest.mark.parametrize("case", ["malformed", "wrong shapes", "wrong layer count", "object array",
                                  "hostile member", "no tokens", "other tokens", "bad partition", "other model",
                                  "missing file"])
def test_cli_bad_input_is_exit_2(files, tmp_path, capsys, case):
    d, good, bad, f32, ids = files
    folder = FIXTURES / "gemma3_text"
    z = load_npz(good)
    path, extra = tmp_path / "p.npz", []
    if case == "malformed":
        np.savez(path, **{**z, "layers.0.up_proj.weight.dense": np.zeros((9, 128, 64))})
    elif case == "wrong shapes":
        np.savez(path, **{**z, "layers.2.up_proj.weight.u": np.zeros((9, 100))})
    elif case == "wrong layer count":
        np.savez(path, **{**z, "n_layers": np.array(5)})
    elif case == "object array":
        np.savez(path, **{**z, "kept": np.array([object()] * 9, dtype=object)})
    elif case == "hostile member":
        np.savez(path, **z)
        _hostile(path, "../../../tmp/evil.npy")
    elif case == "no tokens":
        np.savez(path, **{k: v for k, v in z.items() if k != "input_ids"})
    elif case == "other tokens":
        np.savez(path, **z)
        extra = ["--tokens", ",".join(map(str, ids[::-1]))]
    elif case == "bad partition":
        np.savez(path, **{**z, "context": np.arange(1, 10)})
    elif case == "other model":
        np.savez(path, **z)
        folder = FIXTURES / "llama"
    else:
        path = tmp_path / "missing.npz"
    message = {"malformed": "one of u+v", "wrong shapes": "does not fit the parameter up_proj.weight",
               "wrong layer count": "patches for 5 layers", "object array": "never unpickled",
               "hostile member": "'../../../tmp/evil' is not part of a patch file", "no tokens": "pass --tokens",
               "other tokens": "--tokens differ", "bad partition": "must partition",
               "other model": "has no parameter 'mlp_post_norm.weight'", "missing file": "patch file not found"}[case]
    rc, r = cli(capsys, folder, path, *extra)
    assert rc == 2 and r["ok"] is False and message in r["error"], r
    assert not os.path.exists("/tmp/evil.npy")
    rc = main(["verify-patches", str(folder), str(path), *extra])
    assert rc == 2 and capsys.readouterr().err.startswith("verify-patches failed: ")


def test_a_patch_where_minipatch_makes_none_is_named(tmp_path, capsys):
    """Another implementation also patches an attention weight: the stream diverges at the next
    fixed sublayer and that parameter is named; --json stays strict JSON (inf as a string)."""
    model, ids, ctx = setup("llama")
    res = mp.absorb(model, ids, ctx)
    layers = [dict(lp) for lp in res.patches.layers]
    layers[1]["q_proj.weight"] = Rank1(1e-3 * np.ones((9, 64)), np.ones((9, 64)))
    path = unbound(res.patches, layers).save(tmp_path / "q.npz", context=ctx, input_ids=ids)
    rc = main(["verify-patches", str(FIXTURES / "llama"), str(path), "--json"])
    out = capsys.readouterr().out
    r = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert rc == 1 and r["culprit"] == {"layer": 1, "sublayer": "mlp_hidden", "parameter": "q_proj.weight",
                                        "rel_diff": "inf", "closest": "m2"}
    assert "q_proj.weight which minipatch's m2 leaves unpatched" in r["layers"][1]["verdict"]


@pytest.mark.real
def test_real_gemma_m6a_patches_verify_as_a_different_valid_construction(real_gemma64):
    """Gemma 3 270M in float64: M6a patches (closed loop) are exact and named; M6b has no witness
    there (post-FFW multipliers 1 + g = 0), so it is not among the candidates."""
    ids = np.array([2, 818, 5279, 529, 7001, 563, 9079, 236761])
    ctx = np.arange(1, 5)
    r = verify(real_gemma64, ids, mp.absorb(real_gemma64, ids, ctx, method="m6a").patches, ctx)
    assert r["ok"] and r["logits_max_rel_err"] <= 1e-10 and r["unpatched_max_rel_err"] > 1e-2, r["verdict"]
    assert all(lay["construction"] == "m6a" and lay["minipatch"] == "m6d" for lay in r["layers"])
