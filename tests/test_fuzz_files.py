"""Hypothesis fuzzers of the file side: mutated ``config.json`` fields, safetensors headers and GGUF
metadata of tiny checkpoints either load or raise a minipatch error (a MinipatchError subclass),
never a generic exception, a hang or NaN weights; and loading never modifies a file, a config
dict or a tensor it was given.

Example counts are fixed below (``EXAMPLES``) so the module runs in well under 30 s.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipatch as mp
from minipatch.audit import read_reference
from minipatch.errors import MinipatchError
from minipatch.io.config_check import HF_DEFAULTS
from minipatch.io.hf import model_from_hf

from filekit import FIXTURES, digest, llama_gguf_tensors, read_fixture, st_bytes, write_llama_gguf

try:
    import gguf  # noqa: F401
    HAVE_GGUF = True
except ImportError:
    HAVE_GGUF = False
TINY_GGUF = llama_gguf_tensors()

pytestmark = pytest.mark.io

EXAMPLES = {"config": 100, "safetensors": 60, "gguf": 60, "no_mutation": 20}
_SCALE = float(os.environ.get("MINIPATCH_FUZZ_SCALE", "1"))     # e.g. 20 for a deep local run
EXAMPLES = {k: max(1, int(v * _SCALE)) for k, v in EXAMPLES.items()}
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAMES = ("mistral", "gemma2", "gpt_neox", "phi", "gptj", "qwen2_moe", "mixtral", "qwen3", "olmo2", "qwen2")
_CACHE = {}


def fixture(name):
    if name not in _CACHE:
        config, tensors = read_fixture(name)
        for a in tensors.values():
            a.flags.writeable = False          # any in-place write by a loader would raise
        _CACHE[name] = (config, tensors, {k: hashlib.sha256(a.tobytes()).hexdigest() for k, a in tensors.items()})
    return _CACHE[name]


OUTCOMES = {}


def outcome(call, where="?"):
    """'ok' or the minipatch error's class name; anything else fails the test."""
    try:
        model = call()
    except MinipatchError as e:
        assert str(e), "a minipatch error must say what is wrong"
        OUTCOMES.setdefault(where, {}).setdefault(type(e).__name__, 0)
        OUTCOMES[where][type(e).__name__] += 1
        return type(e).__name__
    OUTCOMES.setdefault(where, {}).setdefault("ok", 0)
    OUTCOMES[where]["ok"] += 1
    for a in [v for k, v in model.params.items() if k != "layers"] + [v for lp in model.params["layers"]
                                                                       for v in lp.values()]:
        assert np.all(np.isfinite(a)), "a loaded model holds non-finite weights"
    return "ok"


# --------------------------------------------------------------------------- config.json fields
values = st.one_of(
    st.integers(-3, 5), st.integers(-10 ** 13, 10 ** 13), st.sampled_from([0, 1, 2, 3, 4, 8, 16, 63, 64, 128]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 0.25, 0.5, 1.0, 1.5]),
    st.none(), st.booleans(), st.text(max_size=8),
    st.sampled_from(["full_attention", "sliding_attention", "default", "linear", "silu", "gelu", "llama"]),
    st.lists(st.one_of(st.integers(-2, 3), st.sampled_from(["full_attention", "sliding_attention", "x"])),
             max_size=4),
    st.dictionaries(st.sampled_from(["rope_theta", "rope_type", "partial_rotary_factor", "full_attention",
                                     "type", "factor"]),
                    st.one_of(st.floats(allow_nan=True), st.integers(-2, 10 ** 6), st.text(max_size=4),
                              st.none()), max_size=3),
)
NESTED = ["rope_parameters.rope_theta", "rope_parameters.partial_rotary_factor", "rope_parameters.rope_type",
          "layer_types.0"]


@st.composite
def config_mutation(draw):
    name = draw(st.sampled_from(NAMES))
    config = fixture(name)[0]
    keys = sorted(set(config) | set(HF_DEFAULTS[config["model_type"]]) | {"rope_scaling"}) + NESTED
    edits = draw(st.lists(st.tuples(st.sampled_from(keys), st.one_of(st.just("delete"), values)),
                          min_size=1, max_size=3))
    return name, edits


def apply(config, edits):
    c = copy.deepcopy(config)
    for key, value in edits:
        if "." in key:
            outer, inner = key.split(".")
            holder = c.get(outer)
            if isinstance(holder, dict):
                holder.pop(inner, None) if value == "delete" else holder.__setitem__(inner, value)
            elif isinstance(holder, list) and holder and inner.isdigit() and value != "delete":
                holder[int(inner)] = value
        elif value == "delete":
            c.pop(key, None)
        else:
            c[key] = value
    return c


@settings(max_examples=EXAMPLES["config"], **FUZZ)
@given(config_mutation())
def test_fuzz_config_fields(case):
    name, edits = case
    config, tensors, hashes = fixture(name)
    bad = apply(config, edits)
    before = copy.deepcopy(bad)
    outcome(lambda: model_from_hf(bad, tensors), 'config')
    assert bad == before or json.dumps(bad, sort_keys=True) == json.dumps(before, sort_keys=True)
    assert {k: hashlib.sha256(a.tobytes()).hexdigest() for k, a in tensors.items()} == hashes


# --------------------------------------------------------------------------- safetensors headers
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "f64", "", 3, None]


@st.composite
def header_mutation(draw):
    config, tensors, _ = fixture("mistral")
    names = list(tensors)
    out = []
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "rename", "extra", "metadata"]))
        if kind == "dtype":
            out.append((kind, target, draw(st.sampled_from(DTYPE_NAMES))))
        elif kind == "shape":
            out.append((kind, target, draw(st.one_of(
                st.lists(st.integers(-2, 300), max_size=4), st.just("swap"), st.just("flat"),
                st.sampled_from([[10 ** 12, 10 ** 12], "x", None])))))
        elif kind == "offsets":
            out.append((kind, target, (draw(st.integers(-8, 8)), draw(st.integers(-8, 8)))))
        elif kind == "rename":
            out.append((kind, target, draw(st.sampled_from(
                ["model.layers.7.mlp.up_proj.weight", "model.layers.99999999999999999999.x", "lm_head.bias",
                 "model.layers.0.self_attn.q_proj.bias", "model.layers.0.rotary_emb.inv_freq", ""]))))
        else:
            out.append((kind, target, draw(values)))
    return out


def mutate_header(h, edits, tensors):
    for kind, target, value in edits:
        if target not in h:
            continue
        e = h[target]
        if kind == "dtype":
            e["dtype"] = value
        elif kind == "shape":
            s = e["shape"]
            e["shape"] = s[::-1] if value == "swap" else [int(np.prod(s))] if value == "flat" else value
        elif kind == "offsets":
            e["data_offsets"] = [e["data_offsets"][0] + value[0], e["data_offsets"][1] + value[1]]
        elif kind == "delete":
            del h[target]
        elif kind == "rename":
            h[value] = h.pop(target)
        elif kind == "extra":
            e["extra"] = value
        else:
            h["__metadata__"] = {"format": value}


@settings(max_examples=EXAMPLES["safetensors"], **FUZZ)
@given(header_mutation())
def test_fuzz_safetensors_header(tmp_path_factory, edits):
    config, tensors, _ = fixture("mistral")
    folder = tmp_path_factory.mktemp("st")
    (folder / "config.json").write_text(json.dumps(config))
    try:
        blob = st_bytes(tensors, lambda h: mutate_header(h, edits, tensors))
    except (TypeError, ValueError):      # a value json cannot encode: not a file anyone could write
        return
    (folder / "model.safetensors").write_bytes(blob)
    before = digest([folder])
    outcome(lambda: mp.load(folder), "safetensors")
    assert digest([folder]) == before


@settings(max_examples=EXAMPLES["safetensors"] // 2, **FUZZ)
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_safetensors_header_bytes(tmp_path_factory, flips):
    """Raw byte edits inside the JSON header (and its length field)."""
    config, tensors, _ = fixture("mistral")
    blob = bytearray(st_bytes(tensors))
    n = 8 + int.from_bytes(blob[:8], "little")
    for where, byte in flips:
        blob[int(where * n)] = byte
    folder = tmp_path_factory.mktemp("sb")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(bytes(blob))
    before = digest([folder])
    outcome(lambda: mp.load(folder), "safetensors bytes")
    assert digest([folder]) == before


# --------------------------------------------------------------------------- GGUF metadata
GGUF_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
             "llama.attention.value_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
             "llama.vocab_size", "llama.rope.scaling.type", "llama.rope.dimension_count", "general.alignment"]
gguf_values = st.one_of(
    st.tuples(st.just("uint32"), st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 1, 2, 3, 8, 16, 32]))),
    st.tuples(st.just("int32"), st.integers(-2 ** 31, 2 ** 31 - 1)),
    st.tuples(st.just("float32"), st.floats(width=32, allow_nan=True, allow_infinity=True)),
    st.tuples(st.just("string"), st.sampled_from(["", "16", "none", "linear", "abc"])),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("array"), st.lists(st.integers(0, 100), min_size=1, max_size=3)),
)


@st.composite
def gguf_mutation(draw):
    meta = draw(st.dictionaries(st.sampled_from(GGUF_KEYS), gguf_values, max_size=3))
    dropped = draw(st.lists(st.sampled_from(GGUF_KEYS), max_size=2))
    flips = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=3))
    return meta, tuple(dropped), flips


@pytest.mark.skipif(not HAVE_GGUF, reason='needs gguf: pip install "minipatch[gguf]"')
@settings(max_examples=EXAMPLES["gguf"], **FUZZ)
@given(gguf_mutation())
def test_fuzz_gguf_metadata(tmp_path_factory, case):
    meta, dropped, flips = case
    path = tmp_path_factory.mktemp("gg") / "m.gguf"
    try:
        write_llama_gguf(path, TINY_GGUF, meta=meta, drop=dropped)
    except (ValueError, OverflowError, struct.error, TypeError):   # the writer refuses the value itself
        return
    if flips:                   # raw byte edits in the header (metadata and tensor info), not the data
        blob = bytearray(path.read_bytes())
        header = len(blob) - sum(a.nbytes for a in TINY_GGUF.values())   # metadata + tensor info (+ padding)
        for where, byte in flips:
            blob[int(where * header)] = byte
        path.write_bytes(bytes(blob))
    before = digest([path])
    outcome(lambda: mp.load(path), "gguf")
    assert digest([path]) == before


# --------------------------------------------------------------------------- nothing is mutated
@settings(max_examples=EXAMPLES["no_mutation"], **FUZZ)
@given(st.sampled_from(NAMES), st.sampled_from(["float64", "float32"]),
       st.sampled_from(["folder", "memory", "reference", "gguf"]))
def test_loading_never_mutates_files_or_inputs(tmp_path_factory, name, dtype, how):
    if how == "folder":
        before = digest([FIXTURES / name])
        assert outcome(lambda: mp.load(FIXTURES / name, dtype=dtype)) == "ok"
        assert digest([FIXTURES / name]) == before
    elif how == "memory":
        config, tensors, hashes = fixture(name)
        frozen = copy.deepcopy(config)
        assert outcome(lambda: model_from_hf(config, tensors, dtype)) == "ok"
        assert config == frozen and {k: hashlib.sha256(a.tobytes()).hexdigest()
                                     for k, a in tensors.items()} == hashes
    elif how == "reference":
        path = FIXTURES / name / "reference.npz"
        before = digest([path])
        read_reference(path)
        assert digest([path]) == before
    elif HAVE_GGUF:
        path = write_llama_gguf(tmp_path_factory.mktemp("g") / "m.gguf")
        before = digest([path])
        assert outcome(lambda: mp.load(path, dtype=dtype)) == "ok"
        assert digest([path]) == before


def test_fuzzers_reach_both_outcomes():
    """Runs after the fuzzers (file order): each reached successful loads and named errors."""
    if not OUTCOMES:
        pytest.skip("run with the fuzzers")
    print("fuzz outcomes:", OUTCOMES)
    for where, seen in OUTCOMES.items():
        errors = [k for k in seen if k != "ok"]
        assert errors or where == "?", (where, seen)
        assert "ok" in seen or where == "safetensors bytes", (where, seen)   # a flipped header byte breaks JSON
