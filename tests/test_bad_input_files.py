"""The file side of "nothing silent": every bad config, checkpoint, GGUF file, dtype argument and
audit reference is a named minipatch error whose message names the offending field or tensor.

One test (or one parametrized case) per category and per case found. Checkpoints come from
``tests/fixtures/`` or are synthesised in ``tmp_path`` (``tests/filekit.py``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import tracemalloc
import zipfile

import numpy as np
import pytest

import minipatch as mp
from minipatch.__main__ import main
from minipatch.audit import read_reference
from minipatch.errors import (ConfigError, InputError, MinipatchError, ModelFileError,
                              UnsupportedArchitectureError)
from minipatch.io.hf import config_from_hf, model_from_hf

from filekit import (FIXTURES, copy_fixture, patch_gguf, read_fixture, write_folder, write_llama_gguf)

pytestmark = pytest.mark.io


@pytest.fixture(autouse=True)
def no_hang():
    """A hang (a FIFO opened for reading blocks forever) fails the test instead of stalling CI."""
    def alarm(*_):
        raise AssertionError("hung: a file read blocked")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def edited(tmp_path, name, edit):
    """A copy of fixture ``name`` whose config.json dict went through ``edit`` (in place)."""
    folder = copy_fixture(name, tmp_path / name)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def put(key, value):
    def edit(c):
        if "." in key:
            outer, inner = key.split(".", 1)
            c[outer][inner] = value
        else:
            c[key] = value
    return edit


def drop(key):
    return lambda c: c.pop(key)


# --------------------------------------------------------------------------- 1. config values
# (fixture, edit, the field the error must name); each is a ConfigError.
CONFIG_CASES = {
    "sliding_window negative": ("mistral", put("sliding_window", -4), "sliding_window"),
    "sliding_window string": ("mistral", put("sliding_window", "4"), "sliding_window"),
    "sliding_window float": ("mistral", put("sliding_window", 4.0), "sliding_window"),
    "sliding layers without window": ("gemma2", put("sliding_window", 0), "sliding_window"),
    "sliding layers null window": ("gemma2", put("sliding_window", None), "sliding_window"),
    "eps negative": ("mistral", put("rms_norm_eps", -1e-5), "rms_norm_eps"),
    "eps zero": ("mistral", put("rms_norm_eps", 0.0), "rms_norm_eps"),
    "eps nan": ("mistral", put("rms_norm_eps", float("nan")), "rms_norm_eps"),
    "eps inf": ("mistral", put("rms_norm_eps", float("inf")), "rms_norm_eps"),
    "eps string": ("mistral", put("rms_norm_eps", "1e-5"), "rms_norm_eps"),
    "layernorm eps negative": ("gpt_neox", put("layer_norm_eps", -1.0), "layer_norm_eps"),
    "gptj eps null": ("gptj", put("layer_norm_epsilon", None), "layer_norm_epsilon"),
    "rope_theta zero": ("mistral", put("rope_parameters.rope_theta", 0), "rope_parameters.rope_theta"),
    "rope_theta negative": ("mistral", put("rope_parameters.rope_theta", -1e4), "rope_parameters.rope_theta"),
    "rope_theta inf": ("olmo2", put("rope_parameters.rope_theta", float("inf")), "rope_parameters.rope_theta"),
    "legacy rope_theta zero": ("mistral", lambda c: (c.pop("rope_parameters"), c.update(rope_theta=0.0)),
                               "rope_theta"),
    "rope_parameters list": ("mistral", put("rope_parameters", [{"rope_theta": 1e4}]), "rope_parameters"),
    "rope_parameters string": ("mistral", put("rope_parameters", "default"), "rope_parameters"),
    "rope_parameters mixed": ("gemma2", put("rope_parameters.full_attention", {"rope_theta": 1e4}),
                              "rope_parameters"),
    "rope per-kind entry missing": ("gemma2", put("rope_parameters", {"sliding_attention": {"rope_theta": 1e4}}),
                                    "rope_parameters.full_attention"),
    "rope_type not a string": ("mistral", put("rope_parameters.rope_type", 3), "rope_parameters.rope_type"),
    "layer_types unknown entry": ("gemma2", put("layer_types", ["sliding_attention", "chunky"]), "layer_types[1]"),
    "layer_types entry a list": ("qwen3", put("layer_types", [[], "full_attention"]), "layer_types[0]"),
    "layer_types wrong length": ("gemma2", put("layer_types", ["full_attention"]), "layer_types"),
    "layer_types not a list": ("gemma2", put("layer_types", "full_attention"), "layer_types"),
    "partial_rotary_factor zero": ("gpt_neox", put("rope_parameters.partial_rotary_factor", 0.0),
                                   "rope_parameters.partial_rotary_factor"),
    "partial_rotary_factor > 1": ("phi", put("rope_parameters.partial_rotary_factor", 1.5),
                                  "rope_parameters.partial_rotary_factor"),
    "partial_rotary_factor -> 0 dims": ("gpt_neox", put("rope_parameters.partial_rotary_factor", 0.01),
                                        "rope_parameters.partial_rotary_factor"),
    "partial_rotary_factor -> odd dims": ("phi", put("rope_parameters.partial_rotary_factor", 0.1875),
                                          "rope_parameters.partial_rotary_factor"),
    "legacy rotary_pct nan": ("gpt_neox", lambda c: (c["rope_parameters"].pop("partial_rotary_factor"),
                                                     c.update(rotary_pct=float("nan"))), "rotary_pct"),
    "model_type list": ("mistral", put("model_type", ["mistral"]), "model_type"),
    "model_type missing": ("mistral", drop("model_type"), "model_type"),
    "zero heads": ("mistral", put("num_attention_heads", 0), "num_attention_heads"),
    "negative heads": ("mistral", put("num_attention_heads", -4), "num_attention_heads"),
    "kv heads not dividing": ("mistral", put("num_key_value_heads", 3), "num_key_value_heads"),
    "zero kv heads": ("mistral", put("num_key_value_heads", 0), "num_key_value_heads"),
    "odd head_dim": ("mistral", put("head_dim", 15), "head_dim"),
    "heads not dividing hidden": ("gpt_neox", put("num_attention_heads", 3), "num_attention_heads"),
    "vocab string": ("mistral", put("vocab_size", "abc"), "vocab_size"),
    "vocab float": ("mistral", put("vocab_size", 128.0), "vocab_size"),
    "vocab bool": ("mistral", put("vocab_size", True), "vocab_size"),
    "vocab absurd": ("mistral", put("vocab_size", 10 ** 12), "vocab_size"),
    "layers 1e6": ("mistral", put("num_hidden_layers", 10 ** 6), "num_hidden_layers"),
    "layers 1e12": ("mistral", put("num_hidden_layers", 10 ** 12), "num_hidden_layers"),
    "layers vs tensor index (more)": ("mistral", put("num_hidden_layers", 3), "num_hidden_layers"),
    "layers vs tensor index (fewer)": ("qwen3", put("num_hidden_layers", 1), "num_hidden_layers"),
    "gptj layers vs index": ("gptj", put("n_layer", 5), "n_layer"),
    "intermediate negative": ("mistral", put("intermediate_size", -1), "intermediate_size"),
    "tie as int": ("mistral", put("tie_word_embeddings", 1), "tie_word_embeddings"),
    "bias as string": ("gpt_neox", put("attention_bias", "yes"), "attention_bias"),
    "activation not a string": ("mistral", put("hidden_act", 5), "hidden_act"),
    "top-k above experts": ("mixtral", put("num_experts_per_tok", 9), "num_experts_per_tok"),
    "top-k zero": ("qwen2_moe", put("num_experts_per_tok", 0), "num_experts_per_tok"),
    "experts zero": ("mixtral", put("num_local_experts", 0), "num_local_experts"),
    "query_pre_attn_scalar zero": ("gemma2", put("query_pre_attn_scalar", 0), "query_pre_attn_scalar"),
    "softcap negative": ("gemma2", put("attn_logit_softcapping", -50.0), "attn_logit_softcapping"),
    "softcap nan": ("gemma2", put("final_logit_softcapping", float("nan")), "final_logit_softcapping"),
    "gptj rotary_dim odd": ("gptj", put("rotary_dim", 7), "rotary_dim"),
    "gptj rotary_dim > head": ("gptj", put("rotary_dim", 32), "rotary_dim"),
    "max_window_layers negative": ("qwen2", lambda c: c.update(use_sliding_window=True, sliding_window=4,
                                                               max_window_layers=-1, layer_types=None),
                                   "max_window_layers"),
    "mlp_only_layers not a list": ("qwen2_moe", put("mlp_only_layers", 1), "mlp_only_layers"),
    "gpt2-style n_inner string": ("gptj", put("n_inner", "32"), "n_inner"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_value(tmp_path, case):
    name, edit, field = CONFIG_CASES[case]
    folder = edited(tmp_path, name, edit)
    with pytest.raises(ConfigError) as e:
        mp.load(folder)
    assert type(e.value) is ConfigError and isinstance(e.value, ValueError)
    assert e.value.field == field, str(e.value)
    assert f"config field {field!r}" in str(e.value) and str(folder / "config.json") in str(e.value)


def test_bad_config_value_needs_no_allocation(tmp_path):
    """num_hidden_layers 1e12 is refused from the config alone, before a per-layer list exists."""
    tracemalloc.start()
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        config_from_hf({"model_type": "llama", "num_hidden_layers": 10 ** 12})
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


# --------------------------------------------------------------------------- 2. valid, not implemented
UNSUPPORTED = {
    "unknown model_type": ("mistral", put("model_type", "nonesuch"), "nonesuch"),
    "llama3 rope scaling": ("mistral", put("rope_parameters.rope_type", "llama3"), "rope_parameters.rope_type"),
    "linear rope per kind": ("gemma2", put("rope_parameters.rope_type", "linear"), "rope_parameters.rope_type"),
    "legacy rope_scaling": ("olmo2", put("rope_scaling", {"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    "unknown activation": ("mistral", put("hidden_act", "tanh"), "hidden_act"),
    "partial rotary on a llama": ("mistral", put("rope_parameters.partial_rotary_factor", 0.5),
                                  "rope_parameters.partial_rotary_factor"),
    "bidirectional gemma": ("gemma2", put("use_bidirectional_attention", True), "use_bidirectional_attention"),
    "phi qk_layernorm": ("phi", put("qk_layernorm", True), "qk_layernorm"),
    "qwen2_moe dense layers": ("qwen2_moe", put("mlp_only_layers", [1]), "mlp_only_layers"),
    "qwen2_moe sparse step": ("qwen2_moe", put("decoder_sparse_step", 2), "decoder_sparse_step"),
    "gptj without rotary_dim": ("gptj", put("rotary_dim", None), "rotary_dim"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_valid_but_unsupported_config(tmp_path, case):
    name, edit, field = UNSUPPORTED[case]
    with pytest.raises(UnsupportedArchitectureError, match=field):
        mp.load(edited(tmp_path, name, edit))


def test_config_not_an_object():
    for bad in ([], "gemma", None, 3):
        with pytest.raises(ConfigError, match="JSON object"):
            config_from_hf(bad)
    _, tensors = read_fixture("mistral")
    with pytest.raises(ConfigError, match="JSON object"):
        model_from_hf([("model_type", "mistral")], tensors)


# --------------------------------------------------------------------------- 3. files
def _fifo(p):
    os.mkfifo(p)


def _dev_zero(p):
    os.symlink("/dev/zero", p)


def _directory(p):
    os.mkdir(p)


def _oversize(p):
    with open(p, "wb") as f:       # sparse: 17 MiB of size, no disk
        f.truncate(17 << 20)


FILE_KINDS = {"fifo": (_fifo, "FIFO"), "dev-zero symlink": (_dev_zero, "character device"),
              "directory": (_directory, "directory")}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
@pytest.mark.parametrize("member", ["config.json", "model.safetensors", "extra.safetensors",
                                    "model.safetensors.index.json"])
def test_non_regular_checkpoint_file(tmp_path, member, kind):
    """Refused from os.stat, never opened: a FIFO would block, /dev/zero would never end."""
    folder = copy_fixture("mistral", tmp_path / "m")
    target = folder / member
    if target.exists():
        target.unlink()
    make, word = FILE_KINDS[kind]
    make(target)
    with pytest.raises(ModelFileError, match=word) as e:
        mp.load(folder)
    assert str(target) in str(e.value)


def test_oversize_config(tmp_path):
    folder = copy_fixture("mistral", tmp_path / "m")
    (folder / "config.json").unlink()
    _oversize(folder / "config.json")
    with pytest.raises(ModelFileError, match=r"config.json has 17825792 bytes, more than the 16777216-byte limit"):
        mp.load(folder)


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_non_regular_gguf_and_reference(tmp_path, kind, capsys):
    make, word = FILE_KINDS[kind]
    make(tmp_path / "m.gguf")
    with pytest.raises(ModelFileError, match="missing config.json" if kind == "directory" else word):
        mp.load(tmp_path / "m.gguf")     # a directory is a checkpoint folder, whatever its name
    make(tmp_path / "ref.npz")
    with pytest.raises(ModelFileError, match=word):
        read_reference(tmp_path / "ref.npz")
    rc = main(["audit", str(FIXTURES / "mistral"), "--reference", str(tmp_path / "ref.npz"), "--json"])
    assert rc == 2 and word in json.loads(capsys.readouterr().out)["error"]


def test_missing_and_malformed_config(tmp_path):
    folder = copy_fixture("mistral", tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "mistral", "model_type": "llama"}')
    with pytest.raises(ModelFileError, match="duplicate key 'model_type'"):
        mp.load(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="top level must be a JSON object"):
        mp.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError, match="missing config.json"):
        mp.load(folder)


# --------------------------------------------------------------------------- 4. weights
def _weights_case(tmp_path, fn, name="mistral"):
    config, tensors = read_fixture(name)
    fn(tensors)
    return write_folder(tmp_path / "w", config, tensors)


def _set(key, index, value):
    def fn(t):
        t[key][index] = value
    return fn


WEIGHT_CASES = {
    "nan in one down_proj": (_set("model.layers.0.mlp.down_proj.weight", (3, 5), np.nan),
                             "model.layers.0.mlp.down_proj.weight", "non-finite"),
    "inf in the embedding": (_set("model.embed_tokens.weight", (0, 0), np.inf), "model.embed_tokens.weight",
                             "non-finite"),
    "-inf in a norm": (_set("model.norm.weight", 2, -np.inf), "model.norm.weight", "non-finite"),
    "all int64": (lambda t: t.update({k: (100 * v).astype(np.int64) for k, v in t.items()}),
                  "lm_head.weight", "stored as I64"),     # the first tensor of the header
    "one uint8 norm": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.uint8)}),
                       "model.norm.weight", "stored as U8"),
    "one bool tensor": (lambda t: t.update({"lm_head.weight": t["lm_head.weight"] > 0}), "lm_head.weight",
                        "stored as BOOL"),
    "one int32 projection": (lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                                 t["model.layers.1.self_attn.k_proj.weight"].astype(np.int32)}),
                             "model.layers.1.self_attn.k_proj.weight", "stored as I32"),
    "wrong shape": (lambda t: t.update({"model.layers.1.mlp.up_proj.weight":
                                        t["model.layers.1.mlp.up_proj.weight"][:16]}),
                    "model.layers.1.mlp.up_proj.weight", "the config implies (32, 64)"),
    "transposed": (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                                       t["model.layers.0.self_attn.o_proj.weight"][:, :32].T.copy()}),
                   "model.layers.0.self_attn.o_proj.weight", "has shape (32, 64)"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_bad_weights(tmp_path, case):
    fn, tensor, message = WEIGHT_CASES[case]
    with pytest.raises(ModelFileError, match=re.escape(message)) as e:
        mp.load(_weights_case(tmp_path, fn))
    assert repr(tensor) in str(e.value)


def test_float64_weight_overflowing_float32(tmp_path):
    folder = _weights_case(tmp_path, _set("model.embed_tokens.weight", (1, 2), 1e300))
    with pytest.raises(ModelFileError, match=r"'model.embed_tokens.weight' holds 1e\+300 at index \(1, 2\), "
                                             r"beyond the float32 range"):
        mp.load(folder, dtype="float32")
    assert mp.load(folder, dtype="float64").dtype == np.float64     # representable: float64 loads


def test_expert_index_beyond_num_experts(tmp_path):
    folder = edited(tmp_path, "mixtral", put("num_local_experts", 4))
    with pytest.raises(ModelFileError, match=r"block_sparse_moe.experts.4.w1.weight' names expert 4; "
                                             r"the config has 4 experts"):
        mp.load(folder)


def test_in_memory_weights(tmp_path):
    config, tensors = read_fixture("qwen3")
    bad = dict(tensors, **{"model.norm.weight": np.where(tensors["model.norm.weight"] > 1, np.nan, 1.0)})
    with pytest.raises(ModelFileError, match="'model.norm.weight' holds .* non-finite"):
        model_from_hf(config, bad)
    with pytest.raises(ModelFileError, match="'model.norm.weight' must be a numpy array"):
        model_from_hf(config, dict(tensors, **{"model.norm.weight": [1.0] * 64}))
    with pytest.raises(ModelFileError, match="tensors must be a dict"):
        model_from_hf(config, list(tensors.items()))


# --------------------------------------------------------------------------- 5. dtype arguments
BAD_DTYPES = [3.5, "bfloat16", "float16", "f8", "double", np.float16, np.int64, int, float, None, "FLOAT32"]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=repr)
def test_bad_dtype_argument(tmp_path, dtype):
    from minipatch.io.gguf import read_gguf
    from minipatch.io.safetensors import read_safetensors

    pytest.importorskip("gguf")
    config, tensors = read_fixture("olmo2")
    gg = write_llama_gguf(tmp_path / "m.gguf")
    calls = [lambda: mp.load(FIXTURES / "olmo2", dtype=dtype), lambda: mp.load(gg, dtype=dtype),
             lambda: read_gguf(gg, dtype=dtype), lambda: model_from_hf(config, tensors, dtype)]
    if dtype is not None:   # read_safetensors(dtype=None) keeps the stored dtypes
        calls.append(lambda: read_safetensors(FIXTURES / "olmo2" / "model.safetensors", dtype=dtype))
    for call in calls:
        with pytest.raises(InputError, match=r"dtype must be one of 'float32', 'float64'") as e:
            call()
        assert repr(dtype) in str(e.value)


@pytest.mark.parametrize("dtype", ["float32", "float64", np.float32, np.float64, np.dtype("float32")], ids=repr)
def test_accepted_dtype_arguments(dtype):
    assert mp.load(FIXTURES / "olmo2", dtype=dtype).dtype == np.dtype(dtype)


# --------------------------------------------------------------------------- 6. GGUF structure and metadata
gguf_cases = {
    "norm retyped F32 -> F16": (dict(name="blk.0.attn_norm.weight", ggml_type=1), "blk.0.attn_norm.weight",
                                "stored as F16; llama.cpp stores norm weights as F32"),
    "norm retyped F32 -> F64": (dict(name="output_norm.weight", ggml_type=28), "output_norm.weight",
                                "stored as F64"),
    "q_norm-free llama norm -> BF16": (dict(name="blk.1.ffn_norm.weight", ggml_type=30), "blk.1.ffn_norm.weight",
                                       "stored as BF16"),
    "matrix retyped F32 -> I32": (dict(name="blk.1.ffn_up.weight", ggml_type=26), "blk.1.ffn_up.weight",
                                  "stored as I32; weights must be floating point"),
    "embedding retyped F32 -> I32": (dict(name="token_embd.weight", ggml_type=26), "token_embd.weight",
                                     "stored as I32"),
    "embedding retyped F32 -> F16": (dict(name="token_embd.weight", ggml_type=1), "output_norm.weight",
                                     "unused bytes before tensor"),
    "matrix retyped F32 -> F64": (dict(name="blk.0.attn_q.weight", ggml_type=28), "blk.0.attn_q.weight",
                                  "overlaps"),
    "two tensors share bytes": (dict(name="blk.0.ffn_norm.weight", offset_from="blk.0.attn_norm.weight"),
                                "blk.0.ffn_norm.weight", "overlaps tensor blk.0.attn_norm.weight"),
    "misaligned data offset": (dict(name="blk.1.attn_v.weight", offset_delta=4), "blk.1.attn_v.weight",
                               "is not aligned to 32"),
    "tensor moved into a hole": (dict(name="output.weight", offset_delta=10 ** 6), "output.weight",
                                 "its data read past the end of the file"),
}


@pytest.mark.parametrize("case", list(gguf_cases))
def test_lying_gguf_tensor_info(tmp_path, case):
    pytest.importorskip("gguf")
    kw, tensor, message = gguf_cases[case]
    kw = dict(kw)
    path = patch_gguf(write_llama_gguf(tmp_path / "m.gguf"), kw.pop("name"), **kw)
    with pytest.raises(ModelFileError, match=message) as e:
        mp.load(path)
    assert tensor in str(e.value)


def test_gguf_trailing_data_and_positive_control(tmp_path):
    pytest.importorskip("gguf")
    path = write_llama_gguf(tmp_path / "m.gguf")
    model = mp.load(path)                                   # the untouched file loads
    assert np.all(np.isfinite(model.forward([1, 2, 3])))
    with open(path, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ModelFileError, match="64 bytes after the last tensor"):
        mp.load(path)


def test_gguf_non_finite_weight(tmp_path):
    pytest.importorskip("gguf")
    from filekit import llama_gguf_tensors

    t = llama_gguf_tensors()
    t["blk.1.ffn_down.weight"][0, 3] = np.inf
    with pytest.raises(ModelFileError, match="blk.1.ffn_down.weight holds 1 non-finite"):
        mp.load(write_llama_gguf(tmp_path / "m.gguf", t))


GGUF_META = {
    "block_count absurd": ({"llama.block_count": ("uint32", 10 ** 9)}, "llama.block_count"),
    "zero heads": ({"llama.attention.head_count": ("uint32", 0)}, "llama.attention.head_count"),
    "kv heads not dividing": ({"llama.attention.head_count_kv": ("uint32", 3),
                               "llama.attention.head_count": ("uint32", 2)}, "llama.attention.head_count_kv"),
    "odd head dim": ({"llama.attention.key_length": ("uint32", 7),
                      "llama.attention.value_length": ("uint32", 7)}, "llama.attention.key_length"),
    "negative eps": ({"llama.attention.layer_norm_rms_epsilon": ("float32", -1e-5)},
                     "llama.attention.layer_norm_rms_epsilon"),
    "nan rope base": ({"llama.rope.freq_base": ("float32", float("nan"))}, "llama.rope.freq_base"),
    "vocab as string": ({"llama.vocab_size": ("string", "32")}, "llama.vocab_size"),
    "embedding as float": ({"llama.embedding_length": ("float32", 16.0)}, "llama.embedding_length"),
    "missing feed_forward_length": ((), "llama.feed_forward_length"),
}


@pytest.mark.parametrize("case", list(GGUF_META))
def test_bad_gguf_metadata(tmp_path, case):
    pytest.importorskip("gguf")
    meta, field = GGUF_META[case]
    if meta == ():
        path = write_llama_gguf(tmp_path / "m.gguf", drop=(field,))
    else:
        path = write_llama_gguf(tmp_path / "m.gguf", meta=meta)
    with pytest.raises(ConfigError) as e:
        mp.load(path)
    assert e.value.field == field and str(path) in str(e.value)


def test_gguf_rope_scaling_unsupported(tmp_path):
    pytest.importorskip("gguf")
    path = write_llama_gguf(tmp_path / "m.gguf", meta={"llama.rope.scaling.type": ("string", "linear")})
    with pytest.raises(UnsupportedArchitectureError, match="llama.rope.scaling.type = 'linear'"):
        mp.load(path)


# --------------------------------------------------------------------------- 7. audit references
def _npz(path, **arrays):
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="module")
def mistral_ref():
    return dict(np.load(FIXTURES / "mistral" / "reference.npz", allow_pickle=False))


def test_unused_member_is_never_inflated(tmp_path, mistral_ref, capsys):
    """A 1 MB npz with a 1 GiB extra member: the member's header is read, its data never."""
    path = _npz(tmp_path / "r.npz", input_ids=mistral_ref["input_ids"], logits=mistral_ref["logits"],
                extra=np.zeros(1 << 27))
    assert os.path.getsize(path) < 2 << 20
    tracemalloc.start()
    ref = read_reference(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert set(ref) == {"input_ids", "logits"} and peak < 16 << 20
    rc = main(["audit", str(FIXTURES / "mistral"), "--reference", str(path), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["ok"] is True


def test_member_longer_than_its_header_declares(tmp_path, mistral_ref):
    path = tmp_path / "r.npz"
    np.savez(path, input_ids=mistral_ref["input_ids"], logits=mistral_ref["logits"])
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("input_ids.npy", members["input_ids.npy"])
        zf.writestr("logits.npy", members["logits.npy"] + b"\0" * 4096)
    with pytest.raises(ModelFileError, match=r"member 'logits.npy': header says \(24, 128\) float64 "
                                             r"\(24576 bytes\), the member holds 28672"):
        read_reference(path)


@pytest.mark.parametrize("case", ["hidden D", "hidden L", "logits V"])
def test_declared_shapes_bounded_by_the_model_before_inflating(tmp_path, mistral_ref, case, capsys):
    ids, lg = mistral_ref["input_ids"], mistral_ref["logits"]
    arrays = {"hidden D": dict(hidden_states=np.zeros((3, 24, 1 << 18))),
              "hidden L": dict(hidden_states=np.zeros((5000, 24, 64))),
              "logits V": dict(logits=np.zeros((24, 1 << 20)))}[case]
    path = _npz(tmp_path / "r.npz", **dict(dict(input_ids=ids, logits=lg), **arrays))
    tracemalloc.start()
    rc = main(["audit", str(FIXTURES / "mistral"), "--reference", str(path), "--json"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = json.loads(capsys.readouterr().out)["error"]
    assert rc == 2 and err.startswith("ModelFileError") and peak < 48 << 20
    assert ("logits per token" if case == "logits V" else "hidden_states") in err


def test_reference_larger_than_memory(tmp_path, mistral_ref, monkeypatch, capsys):
    import minipatch.npzfile as npzfile

    path = _npz(tmp_path / "r.npz", input_ids=mistral_ref["input_ids"], logits=mistral_ref["logits"])
    monkeypatch.setattr(npzfile, "physical_memory", lambda: 4096)
    with pytest.raises(ModelFileError, match="cannot be read"):
        read_reference(path)
    rc = main(["audit", str(FIXTURES / "mistral"), "--reference", str(path), "--json"])
    assert rc == 2 and "cannot be read" in json.loads(capsys.readouterr().out)["error"]


def test_allocation_failure_during_the_audit_is_exit_2(tmp_path, mistral_ref, monkeypatch, capsys):
    """A MemoryError anywhere in the audit (e.g. a forward on a huge T) is a named error, exit 2."""
    def boom(*a, **k):
        raise MemoryError("Unable to allocate 9.3 GiB")
    monkeypatch.setattr(mp.Model, "forward", boom)
    path = _npz(tmp_path / "r.npz", input_ids=mistral_ref["input_ids"], logits=mistral_ref["logits"])
    rc = main(["audit", str(FIXTURES / "mistral"), "--reference", str(path), "--json"])
    err = json.loads(capsys.readouterr().out)["error"]
    assert rc == 2 and err.startswith("ModelFileError") and "more memory" in err and str(path) in err


def test_every_error_here_is_a_minipatch_value_error():
    for cls in (ConfigError, ModelFileError, UnsupportedArchitectureError, InputError):
        assert issubclass(cls, MinipatchError) and issubclass(cls, ValueError)
