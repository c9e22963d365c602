"""Patch files (FORMATS.md, minipatch/patchfile.py): Patches.save / Patches.load round trips, dense
per-token deltas, and every malformed file refused with a named error before its data is used.

A patch file from another implementation is read like a checkpoint: plain arrays only, headers
checked against the model before any data is inflated, nothing unpickled.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

import minipatch as mp
from helpers import CONTROL_MIN, FIXTURES, TOL64_MODEL, load_npz, rel_err
from minipatch.errors import InputError, ModelFileError, PatchMismatchError
from minipatch.patches import Dense, Patches, Rank1, Scale
from minipatch.patchfile import FORMAT, load_patches

pytestmark = pytest.mark.audit


@pytest.fixture(scope="module")
def gemma():
    model = mp.load(FIXTURES / "gemma3_text")
    ref = load_npz(FIXTURES / "gemma3_text" / "reference.npz")
    return model, ref["input_ids"], ref["context_positions"]


def patched(model, ids, patches):
    kept = np.asarray(patches.positions)
    return model.forward(ids[kept], positions=kept, patches=patches)


@pytest.mark.parametrize("name, method", [("gemma3_text", "auto"), ("gemma3_text", "m6b"), ("mixtral", "all"),
                                          ("gpt2", "bias"), ("qwen2_moe", "one")])
def test_round_trip_is_bitwise(name, method, tmp_path):
    """Save then load: the same arrays, the same patched logits bit for bit, the origin kept."""
    model = mp.load(FIXTURES / name)
    ref = load_npz(FIXTURES / name / "reference.npz")
    ids, ctx = ref["input_ids"], ref["context_positions"]
    res = mp.absorb(model, ids, ctx, method=method)
    path = res.patches.save(tmp_path / "p.npz", context=res.context, input_ids=ids)
    got = load_patches(path, model)
    assert got.window_by == "position" and np.array_equal(got.context, ctx) and np.array_equal(got.input_ids, ids)
    back = Patches.load(path, model)
    assert back.origin == res.patches.origin and back.methods == res.patches.methods
    assert np.array_equal(patched(model, ids, back), patched(model, ids, res.patches))
    assert rel_err(patched(model, ids, back), model.forward(ids)[res.kept]) <= TOL64_MODEL
    assert rel_err(model.forward(ids[res.kept], positions=res.kept), model.forward(ids)[res.kept]) > CONTROL_MIN


def test_saved_patches_stay_bound_to_their_model(gemma, tmp_path):
    model, ids, ctx = gemma
    path = mp.absorb(model, ids, ctx).patches.save(tmp_path / "p.npz")
    other = mp.models.tiny_gemma(seed=3, vocab_size=128, n_layers=4)
    back = Patches.load(path)
    with pytest.raises(PatchMismatchError, match="another model"):
        patched(other, ids, back)


@pytest.mark.parametrize("name", ["gemma3_text", "mixtral"])
def test_dense_deltas_equal_their_rank_one_factors(name, tmp_path):
    """A file of dense per-token deltas (another implementation's form) gives the same run."""
    model = mp.load(FIXTURES / name)
    ref = load_npz(FIXTURES / name / "reference.npz")
    ids, ctx = ref["input_ids"], ref["context_positions"]
    res = mp.absorb(model, ids, ctx)
    layers = [{k: (Dense(np.stack([p.dense(t) for t in range(p.n_tokens)])) if isinstance(p, Rank1) else p)
               for k, p in lp.items()} for lp in res.patches.layers]
    path = Patches(tuple(layers), res.kept).save(tmp_path / "d.npz", context=ctx)
    with zipfile.ZipFile(path) as zf:
        assert any(n.endswith(".dense.npy") for n in zf.namelist())
    back = Patches.load(path, model)
    assert all(isinstance(p, Dense) for lp in back.layers for k, p in lp.items() if k.endswith(".weight")
               and "norm" not in k)
    assert rel_err(patched(model, ids, back), patched(model, ids, res.patches)) <= 1e-13


def test_format_member_and_text_layout(gemma, tmp_path):
    model, ids, ctx = gemma
    path = mp.absorb(model, ids, ctx).patches.save(tmp_path / "p.npz", context=ctx)
    z = load_npz(path)
    assert str(z["format"]) == FORMAT and int(z["n_layers"]) == 4 and str(z["window_by"]) == "position"
    assert z["layers.0.gate_proj.weight.u"].shape == (9, 128) and z["layers.0.gate_proj.weight.v"].shape == (9, 64)
    assert z["layers.0.mlp_post_norm.weight.add"].shape == (9, 64)
    assert all(a.dtype != object for a in z.values())


# --------------------------------------------------------------------------- malformed files


def _file(tmp_path, base, edit):
    arrays = dict(base)
    edit(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def base(gemma, tmp_path_factory):
    model, ids, ctx = gemma
    path = mp.absorb(model, ids, ctx, method="m6a").patches.save(tmp_path_factory.mktemp("b") / "p.npz",
                                                                  context=ctx, input_ids=ids)
    z = load_npz(path)
    return {k: v for k, v in z.items() if not k.startswith("origin.")}


U = "layers.0.gate_proj.weight.u"
BAD = {
    "unknown member": (lambda a: a.__setitem__("notes", np.zeros(1)), "is not part of a patch file"),
    "path-like member": (lambda a: a.__setitem__("../../etc/evil", np.zeros(1)), "is not part of a patch file"),
    "unknown field": (lambda a: a.__setitem__("layers.0.gate_proj.weight.w", np.zeros((9, 3))), "not part of"),
    "u without v": (lambda a: a.pop("layers.0.gate_proj.weight.v"), "has fields ['u']"),
    "u and dense": (lambda a: a.__setitem__("layers.0.gate_proj.weight.dense", np.zeros((9, 128, 64))), "one of u+v"),
    "wrong width": (lambda a: a.__setitem__(U, np.zeros((9, 127))), "does not fit the parameter gate_proj.weight"),
    "wrong T_K": (lambda a: a.__setitem__(U, np.zeros((8, 128))), "is not [T_K, ...] with T_K = 9"),
    "wrong layer count": (lambda a: a.__setitem__("n_layers", np.array(3)), "patches for 3 layers, the model has 4"),
    "layer beyond model": (lambda a: (a.__setitem__("layers.7.gate_proj.weight.u", a[U]),
                                      a.__setitem__("layers.7.gate_proj.weight.v", a["layers.0.gate_proj.weight.v"])),
                           "the model has 4 layers"),
    "unknown parameter": (lambda a: (a.__setitem__("layers.0.fc_in.weight.u", a[U]),
                                     a.__setitem__("layers.0.fc_in.weight.v", a["layers.0.gate_proj.weight.v"])),
                          "has no parameter 'fc_in.weight'; this gemma3 layer has"),
    "nan": (lambda a: a.__setitem__(U, np.full((9, 128), np.nan)), "non-finite"),
    "integer factor": (lambda a: a.__setitem__(U, np.ones((9, 128), dtype=np.int64)), "real floating"),
    "mixed dtypes": (lambda a: a.__setitem__(U, a[U].astype(np.float32)), "mix dtypes"),
    "kept not increasing": (lambda a: a.__setitem__("kept", a["kept"][::-1].copy()), "strictly increasing"),
    "context overlaps": (lambda a: a.__setitem__("context", np.r_[a["context"], 0]), "disjoint from kept"),
    "no kept": (lambda a: a.pop("kept"), "needs a 1-D 'kept' member"),
    "no n_layers": (lambda a: a.pop("n_layers"), "missing 'n_layers'"),
    "wrong format": (lambda a: a.__setitem__("format", np.array("other/2")), "expected 'minipatch-patches/1'"),
    "bad window_by": (lambda a: a.__setitem__("window_by", np.array("tokens")), "window_by must be"),
    "negative kept": (lambda a: a.__setitem__("kept", a["kept"] - 5), "must lie in [0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_patch_file_is_refused(gemma, base, tmp_path, case):
    model = gemma[0]
    edit, message = BAD[case]
    path = _file(tmp_path, base, edit)
    with pytest.raises(ModelFileError) as e:
        load_patches(path, model)
    assert message in str(e.value) and str(path) in str(e.value)


def test_object_array_is_never_unpickled(gemma, base, tmp_path):
    class Bomb:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "unpickled"),))

    path = tmp_path / "p.npz"
    np.savez(path, **{**base, U: np.array([Bomb()] * 9, dtype=object)})
    with pytest.raises(ModelFileError, match="object array .* never unpickled"):
        load_patches(path, gemma[0])
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("how", ["truncated", "not a zip", "lying header", "missing"])
def test_damaged_files(gemma, base, tmp_path, how):
    path = tmp_path / "p.npz"
    np.savez(path, **base)
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not a zip":
        path.write_bytes(b"PK\x03\x04 definitely not")
    elif how == "lying header":
        with zipfile.ZipFile(path) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist()}
        with zipfile.ZipFile(path, "w") as zf:
            for k, v in members.items():
                zf.writestr(k, v + (b"\0" * 64 if k == U + ".npy" else b""))
    else:
        path = tmp_path / "missing.npz"
    with pytest.raises(ModelFileError, match="patch file not found|not a readable .npz|header says"):
        load_patches(path, gemma[0])


def test_huge_declared_member_is_refused_before_inflating(gemma, base, tmp_path):
    """A compressed 2^23-element member (75 MB): refused by its header against the model, memory stays low."""
    import tracemalloc

    path = tmp_path / "p.npz"
    np.savez_compressed(path, **{**base, "layers.0.down_proj.weight.dense": np.zeros((9, 1 << 10, 1 << 10))})
    assert path.stat().st_size < 8 << 20
    tracemalloc.start()
    with pytest.raises(ModelFileError, match="does not fit the parameter down_proj.weight"):
        load_patches(path, gemma[0])
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()


@pytest.mark.parametrize("name, patch", [("mlp_norm.weight", Scale(add=np.zeros((9, 64)))),
                                         ("mlp_post_norm.weight", Rank1(np.zeros((9, 64)), np.zeros((9, 64)))),
                                         ("gate_proj.weight", Scale(add=np.zeros((9, 128))))])
def test_patches_the_forward_would_ignore_are_refused(gemma, name, patch):
    """A Scale on a pre-norm (which the forward never patches) is an error, not a silent no-op."""
    model, ids, ctx = gemma
    kept = np.setdiff1d(np.arange(24), ctx)
    layers = [dict() for _ in range(4)]
    layers[0][name] = patch
    with pytest.raises(InputError, match="the forward applies"):
        model.forward(ids[kept], positions=kept, patches=Patches(tuple(layers), kept))
