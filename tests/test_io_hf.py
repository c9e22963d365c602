"""Loading the Hugging Face fixtures (tests/fixtures) and reproducing their true-float64 logits."""
import numpy as np
import pytest

import minipatch as mp

from helpers import TOL64_MODEL, rel_err, fixture

pytestmark = pytest.mark.io
FAMILIES = {"gemma3_text": "gemma", "llama": "llama", "gpt2": "gpt2"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request):
    path = fixture(request.param)
    ref = dict(np.load(path / "reference.npz", allow_pickle=False))
    return request.param, mp.load(path, dtype="float64"), ref


def test_logits_and_hidden_states(loaded):
    name, model, ref = loaded
    tr = {}
    logits = model.forward(ref["input_ids"], trace=tr)
    assert rel_err(logits, ref["logits"]) <= 1e-12
    assert rel_err(logits, ref["logits_stock"]) > 1e-9 or name == "gpt2"   # stock fp64 is partly fp32
    for i, h in enumerate(ref["hidden_states"]):
        assert rel_err(tr["hidden_states"][i], h) <= 1e-12, i
    assert rel_err(tr["final_prenorm"], ref["hidden_final_prenorm"]) <= 1e-12


def test_kept_only_both_window_conventions(loaded):
    name, model, ref = loaded
    kept, tok = ref["kept_positions"], ref["input_ids"]
    hf = model.forward(tok[kept], positions=kept, window_by="index")
    assert rel_err(hf, ref["logits_kept_only"]) <= 1e-12
    if "logits_kept_only_poswindow" in ref:
        ours = model.forward(tok[kept], positions=kept)
        assert rel_err(ours, ref["logits_kept_only_poswindow"]) <= 1e-12
        assert rel_err(ours, ref["logits_kept_only"]) > 1e-3       # the conventions differ


@pytest.mark.m7
@pytest.mark.parametrize("window_by", ["position", "index"])
def test_theorem_on_checkpoint(loaded, window_by):
    name, model, ref = loaded
    tok, ctx, kept = ref["input_ids"], ref["context_positions"], ref["kept_positions"]
    res = mp.absorb(model, tok, ctx, window_by=window_by)
    assert res.kept.tolist() == kept.tolist()
    patched = mp.patched_forward(model, tok, res, window_by=window_by)
    assert rel_err(patched, ref["logits"][kept]) <= TOL64_MODEL
    assert rel_err(model.forward(tok[kept], positions=kept, window_by=window_by), ref["logits"][kept]) > 1e-3


def test_float32_load(loaded):
    name, _, ref = loaded
    m32 = mp.load(fixture(name), dtype="float32")
    assert m32.dtype == np.float32
    assert rel_err(m32.forward(ref["input_ids"]), ref["logits"]) <= 1e-4


def test_folder_errors(tmp_path):
    from minipatch.errors import ModelFileError, UnsupportedArchitectureError
    import json
    import shutil

    src = fixture("llama")
    bad = tmp_path / "m"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="nonesuch")))
    with pytest.raises(UnsupportedArchitectureError):
        mp.load(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(ModelFileError):
        mp.load(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32)))
    with pytest.raises(ModelFileError):
        mp.load(bad)
    with pytest.raises(ModelFileError):
        mp.load(tmp_path / "x.bin") if (tmp_path / "x.bin").write_bytes(b"0") else None
