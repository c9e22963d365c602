"""Every loader default is the Hugging Face default of its model_type, checked against transformers.

1. Each entry of ``HF_DEFAULTS`` (minipatch/io/config_check.py) against the field default of the
   transformers config class (the legacy RoPE keys against the class's resolved ``rope_parameters``).
2. Per fixture family, the config as transformers 4.x saved it -- every key equal to the class
   default left out (``to_diff_dict``; e.g. Gemma 3 without ``tie_word_embeddings``) -- loads into
   the same ModelConfig as the full config, and the model built from it gives the same logits.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import minipatch as mp
from helpers import FIXTURES
from minipatch.io.config_check import HF_DEFAULTS
from minipatch.io.hf import config_from_hf

pytestmark = pytest.mark.io
transformers = pytest.importorskip("transformers", reason='needs transformers: pip install -e ".[hf]"')

FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())
FALSY = (None, False, [])


def class_defaults(model_type):
    """{field: default} of the transformers config class (a dataclass in transformers 5)."""
    cls = transformers.CONFIG_MAPPING[model_type]
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def rope_default(model_type, key):
    """A legacy RoPE key's default, from the class's resolved rope_parameters."""
    rp = transformers.AutoConfig.for_model(model_type).rope_parameters
    full = rp.get("full_attention", rp)
    return {"rope_theta": full["rope_theta"], "rotary_emb_base": full["rope_theta"],
            "rope_local_base_freq": rp.get("sliding_attention", {}).get("rope_theta"),
            "partial_rotary_factor": full.get("partial_rotary_factor", 1.0),
            "rotary_pct": full.get("partial_rotary_factor", 1.0)}[key]


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_every_default_is_the_transformers_default(model_type):
    defaults = class_defaults(model_type)
    attrs = transformers.AutoConfig.for_model(model_type)
    for key, ours in HF_DEFAULTS[model_type].items():
        if key in defaults:
            theirs = defaults[key]
            assert theirs == ours or (theirs in FALSY and ours in FALSY), (model_type, key, ours, theirs)
        elif key in ("rope_theta", "rotary_emb_base", "rope_local_base_freq", "partial_rotary_factor", "rotary_pct"):
            assert rope_default(model_type, key) == ours, (model_type, key)
        elif key == "sliding_window_pattern":       # Gemma 3: the class's _sliding_window_pattern
            assert getattr(attrs, "_sliding_window_pattern", None) == ours
        else:                                       # not an option of this model: minipatch reads it as off
            assert ours in FALSY, (model_type, key, ours)


def diff_config(config):
    """The config as transformers 4.x saved it: every key whose value is the class default dropped."""
    defaults = transformers.AutoConfig.for_model(config["model_type"]).to_dict()
    return {k: v for k, v in config.items() if k == "model_type" or k not in defaults or defaults[k] != v}


@pytest.mark.parametrize("name", FAMILIES)
def test_config_saved_without_default_values_loads_the_same(name, tmp_path):
    full = json.loads((FIXTURES / name / "config.json").read_text())
    diff = diff_config(full)
    assert len(diff) < len(full)
    assert config_from_hf(diff) == config_from_hf(full)


def test_gemma3_checkpoint_without_tie_word_embeddings(tmp_path):
    """The case of the issue: transformers 4.57 omits tie_word_embeddings (True is Gemma 3's
    default); the checkpoint holds no lm_head, and minipatch loads it tied, same logits."""
    folder = tmp_path / "g"
    shutil.copytree(FIXTURES / "gemma3_text", folder)
    full = json.loads((folder / "config.json").read_text())
    diff = diff_config(full)
    assert "tie_word_embeddings" not in diff and full["tie_word_embeddings"] is True
    (folder / "config.json").write_text(json.dumps(diff))
    a, b = mp.load(folder), mp.load(FIXTURES / "gemma3_text")
    ids = np.arange(2, 20)
    assert a.cfg.tie_embeddings and np.array_equal(a.forward(ids), b.forward(ids))
