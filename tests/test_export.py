"""Export (minipatch.io.export): an edited model written as a Hugging Face folder loads in
transformers and gives minipatch's logits (float32, 1e-4 absolute), and in minipatch bit for bit."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minipatch as mp
from minipatch.errors import ModelFileError, UnsupportedArchitectureError
from minipatch.io.export import hf_config, hf_tensors
from minipatch.io.safetensors import read_safetensors, write_safetensors
from minipatch.models import tiny
from minipatch.thought import condensed_model

from helpers import fixture

pytestmark = pytest.mark.io


def _edited(name):
    """The fixture checkpoint in float32 with a dense change of every MLP weight and norm scale."""
    m = mp.load(fixture(name), dtype="float32")
    rng = np.random.default_rng(0)
    deltas = [{k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in lp.items()
               if k.startswith(("down_proj", "gate_proj", "mlp_post_norm"))} for lp in m.params["layers"]]
    return m, condensed_model(m, deltas)


@pytest.mark.parametrize("name", ["gemma3_text", "llama"])
def test_export_round_trip_with_transformers(name, tmp_path):
    torch = pytest.importorskip("torch", reason='needs torch: pip install -e ".[hf]"')
    transformers = pytest.importorskip("transformers", reason='needs transformers: pip install -e ".[hf]"')
    m, edited = _edited(name)
    folder = edited.save_pretrained(tmp_path / "out", extra={"bos_token_id": 2})
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == json.loads((fixture(name) / "config.json").read_text())["model_type"]
    assert ("lm_head.weight" in read_safetensors(folder / "model.safetensors")) == (not m.cfg.tie_embeddings)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, m.cfg.vocab_size, 12)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens[None])).logits[0].numpy()
    ours = edited.forward(tokens, window_by="index")            # Hugging Face's window convention
    assert np.abs(theirs - ours).max() <= 1e-4
    assert np.abs(theirs - m.forward(tokens, window_by="index")).max() > 1e-2     # the edit is in the file
    back = mp.load(folder, dtype="float32")
    for a, b in zip(back.params["layers"], edited.params["layers"]):
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_gemma_norms_are_stored_as_g():
    """Gemma's multiplier is 1 + g; Hugging Face stores g, and so does the export."""
    m = mp.load(fixture("gemma3_text"), dtype="float64")
    t = hf_tensors(m)
    assert np.array_equal(t["model.layers.0.post_feedforward_layernorm.weight"], m.params["layers"][0]["mlp_post_norm.weight"])
    assert "lm_head.weight" not in t and m.cfg.tie_embeddings
    stored = read_safetensors(fixture("gemma3_text") / "model.safetensors")
    assert all(np.array_equal(stored[k], v) for k, v in t.items())          # the loader's table, inverted


def test_config_round_trip_and_refusals():
    m = mp.load(fixture("gemma3_text"), dtype="float64")
    from minipatch.io.hf import config_from_hf

    assert config_from_hf(hf_config(m.cfg)) == m.cfg
    with pytest.raises(ModelFileError):
        hf_config(m.cfg, extra={"num_hidden_layers": 9})
    with pytest.raises(UnsupportedArchitectureError):
        hf_config(tiny("gpt2").cfg)
    with pytest.raises(UnsupportedArchitectureError):
        hf_config(tiny("llama", attn_bias=True, o_bias=False).cfg)


def test_safetensors_writer(tmp_path):
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]), "c": np.zeros(0, np.int64),
         "d": np.array([1.5], dtype=">f8")}
    write_safetensors(tmp_path / "x.safetensors", t, metadata={"format": "pt"})
    back = read_safetensors(tmp_path / "x.safetensors")
    assert list(back) == list(t) and all(np.array_equal(back[k], v) for k, v in t.items())
    st = pytest.importorskip("safetensors.numpy", reason='needs safetensors: pip install -e ".[hf]"')
    theirs = st.load_file(str(tmp_path / "x.safetensors"))
    assert all(np.array_equal(theirs[k], v) for k, v in t.items())
    with pytest.raises(ModelFileError):
        write_safetensors(tmp_path / "y.safetensors", {"z": np.zeros(2, np.complex64)})
