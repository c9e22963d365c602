"""Tests of the strict safetensors reader (minipatch/io/safetensors.py)."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import fixture
from minipatch.errors import ModelFileError
from minipatch.io.safetensors import read_checkpoint_folder, read_safetensors

pytestmark = pytest.mark.io


_NAMES = {
    np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("i1"): "I8",
    np.dtype("u1"): "U8", np.dtype("bool"): "BOOL",
}


# --------------------------------------------------------------------------- a tiny writer
def pack(tensors, metadata=None, *, header_edit=None, pad_to=8):
    """Serialize {name: array} (or {name: (dtype_name, shape, raw_bytes)}) to safetensors bytes.

    header_edit(header) may mutate the header dict before it is encoded.
    """
    header, chunks, pos = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        if isinstance(t, tuple):
            dtype_name, shape, raw = t
        else:
            a = np.asarray(t)
            dtype_name, shape = _NAMES[a.dtype.newbyteorder("<") if a.dtype.itemsize > 1
                                       else a.dtype], list(a.shape)
            raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    if header_edit is not None:
        header_edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % pad_to)
    return struct.pack("<Q", len(hb)) + hb + b"".join(chunks)


def raw_file(header_bytes, data=b""):
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


@pytest.fixture
def write(tmp_path):
    counter = [0]

    def _write(blob, name=None):
        counter[0] += 1
        p = tmp_path / (name or f"f{counter[0]}.safetensors")
        p.write_bytes(blob)
        return p

    return _write


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "a.f64": rng.standard_normal((3, 4)),
        "b.f32": rng.standard_normal((5,)).astype(np.float32),
        "c.f16": rng.standard_normal((2, 2)).astype(np.float16),
        "d.i64": np.arange(6, dtype=np.int64).reshape(2, 3) - 3,
        "e.i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "f.i8": np.array([-128, 0, 127], dtype=np.int8),
        "g.u8": np.array([[0, 255]], dtype=np.uint8),
        "h.bool": np.array([True, False, True]),
        "i.scalar": np.array(2.5),
        "j.empty": np.zeros((0, 3)),
    }


# --------------------------------------------------------------------------- round trips
def test_round_trip_all_dtypes(write):
    src = sample_tensors()
    got = read_safetensors(write(pack(src, metadata={"format": "pt"})))
    assert list(got) == list(src)
    for name, a in src.items():
        assert got[name].dtype == a.dtype, name
        assert got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a)
        assert got[name].flags.owndata or got[name].base is not None
        assert got[name].flags.writeable and got[name].flags.c_contiguous


def test_returned_arrays_are_independent_copies(write):
    p = write(pack({"w": np.ones((2, 2))}))
    got = read_safetensors(p)
    got["w"][0, 0] = 7.0
    assert read_safetensors(p)["w"][0, 0] == 1.0


def test_dtype_conversion_only_touches_floats(write):
    src = sample_tensors()
    got = read_safetensors(write(pack(src)), dtype=np.float64)
    for name, a in src.items():
        if np.issubdtype(a.dtype, np.floating):
            assert got[name].dtype == np.float64
            np.testing.assert_array_equal(got[name], a.astype(np.float64))
        else:
            assert got[name].dtype == a.dtype


def test_bf16_is_widened_exactly():
    vals = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 1e-38], dtype=np.float32)
    bits = (vals.view(np.uint32) >> 16).astype("<u2")  # exact for these values
    blob = pack({"x": ("BF16", [7], bits.tobytes())})
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(blob)
        got = read_safetensors(p)["x"]
    assert got.dtype == np.float32
    expect = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(got[:4], [1.0, -2.5, 3.140625, 0.0])


def test_big_endian_host_independent(write):
    # Stored bytes are little-endian; the result is native order whatever the input order.
    a = np.arange(4, dtype=">f8")
    got = read_safetensors(write(pack({"x": a})))["x"]
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, [0, 1, 2, 3])


def test_empty_file_of_tensors(write):
    assert read_safetensors(write(raw_file(b"{}"))) == {}
    assert read_safetensors(write(raw_file(b'{"__metadata__": {"a": "b"}}  '))) == {}


def test_llama_fixture():
    """The HF llama fixture, against a plain header-then-frombuffer parse written here."""
    p = fixture("llama/model.safetensors")
    got = read_safetensors(p)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    assert set(got) == set(header) and len(got) > 10
    for name, h in header.items():
        a, b = h["data_offsets"]
        want = np.frombuffer(raw[8 + n + a:8 + n + b], "<f8").reshape(h["shape"])
        np.testing.assert_array_equal(got[name], want)
    w = got["model.layers.0.self_attn.q_proj.weight"]
    assert w.shape == (64, 64) and w.dtype == np.float64 and np.abs(w).max() > 0
    cfg, tensors = read_checkpoint_folder(p.parent)
    assert cfg["model_type"] == "llama"
    assert set(tensors) == set(got)


# --------------------------------------------------------------------------- malformed files
def _edit(fn):
    return pack({"a": np.arange(4.0), "b": np.arange(3, dtype=np.int32)}, header_edit=fn)


def _set(name, key, value):
    def fn(h):
        h[name][key] = value
    return fn


MALFORMED = {
    "empty_file": b"",
    "seven_bytes": b"\x00" * 7,
    "header_len_past_eof": struct.pack("<Q", 1000) + b"{}",
    "header_len_absurd": struct.pack("<Q", 2**63) + b"{}",
    "header_len_just_over_limit": struct.pack("<Q", 100_000_001) + b"{}",
    "header_empty": raw_file(b""),
    "header_not_utf8": raw_file(b'{"\xff": 1}'),
    "header_not_json": raw_file(b"{not json"),
    "header_array": raw_file(b"[1, 2]"),
    "header_string": raw_file(b'"abc"'),
    "header_nan_only": raw_file(b"NaN"),
    "header_deep_nesting": raw_file(b"[" * 100_000 + b"]" * 100_000),
    "duplicate_names": raw_file(
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"\x01\x02"),
    "metadata_not_str": _edit(lambda h: h.__setitem__("__metadata__", {"k": 1})),
    "metadata_list": _edit(lambda h: h.__setitem__("__metadata__", ["x"])),
    "entry_not_object": _edit(lambda h: h.__setitem__("a", [1, 2])),
    "entry_missing_key": _edit(lambda h: h["a"].pop("shape")),
    "entry_extra_key": _edit(_set("a", "extra", 1)),
    "unknown_dtype": _edit(_set("a", "dtype", "F128")),
    "dtype_lowercase": _edit(_set("a", "dtype", "f64")),
    "dtype_not_string": _edit(_set("a", "dtype", 8)),
    "unsupported_dtype_u16": _edit(_set("a", "dtype", "U16")),
    "shape_negative": _edit(_set("a", "shape", [-4])),
    "shape_float": _edit(_set("a", "shape", [4.0])),
    "shape_bool": _edit(_set("a", "shape", [True, 4])),
    "shape_not_list": _edit(_set("a", "shape", 4)),
    "shape_null": _edit(_set("a", "shape", None)),
    "shape_mismatch": _edit(_set("a", "shape", [5])),
    "shape_huge": _edit(_set("a", "shape", [2**62, 2**62])),
    "dtype_mismatch": _edit(_set("a", "dtype", "F32")),
    "offsets_one_value": _edit(_set("a", "data_offsets", [0])),
    "offsets_three_values": _edit(_set("a", "data_offsets", [0, 32, 32])),
    "offsets_reversed": _edit(_set("a", "data_offsets", [32, 0])),
    "offsets_negative": _edit(_set("a", "data_offsets", [-8, 24])),
    "offsets_float": _edit(_set("a", "data_offsets", [0.0, 32.0])),
    "offsets_past_buffer": _edit(_set("b", "data_offsets", [36, 48])),
    "offsets_overlap": _edit(_set("b", "data_offsets", [28, 40])),
    "offsets_same_span": _edit(lambda h: h.__setitem__(
        "c", {"dtype": "F64", "shape": [4], "data_offsets": [0, 32]})),
    "offsets_hole": _edit(lambda h: (h["a"].__setitem__("shape", [3]),
                                     h["a"].__setitem__("data_offsets", [0, 24]))),
    "trailing_garbage": _edit(lambda h: None) + b"\x00",
    "truncated_buffer": _edit(lambda h: None)[:-1],
    "bool_not_0_1": pack({"m": ("BOOL", [2], b"\x01\x02")}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_raises_model_file_error(case, write):
    with pytest.raises(ModelFileError) as info:
        read_safetensors(write(MALFORMED[case]))
    assert ".safetensors" in str(info.value)  # the message names the file


def test_sanity_of_malformed_base(write):
    # The unedited base file loads, so each case above fails for its own reason.
    got = read_safetensors(write(_edit(lambda h: None)))
    np.testing.assert_array_equal(got["a"], np.arange(4.0))


def test_missing_file_is_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="cannot open"):
        read_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("case,pattern", [
    ("seven_bytes", "shorter than the 8-byte"),
    ("header_len_absurd", "exceeds"),
    ("header_len_past_eof", "runs past the end"),
    ("header_not_utf8", "UTF-8"),
    ("header_not_json", "not valid JSON"),
    ("header_array", "must be a JSON object"),
    ("unknown_dtype", "unknown or unsupported dtype"),
    ("shape_negative", "non-negative ints"),
    ("shape_mismatch", "needs"),
    ("offsets_past_buffer", "past the end"),
    ("offsets_overlap", "overlaps"),
    ("offsets_hole", "holes"),
    ("trailing_garbage", "trailing"),
    ("duplicate_names", "duplicate key"),
])
def test_error_messages_are_specific(case, pattern, write):
    with pytest.raises(ModelFileError, match=pattern):
        read_safetensors(write(MALFORMED[case]))


# --------------------------------------------------------------------------- checkpoint folders
def _folder(tmp_path, shards, config='{"model_type": "llama"}'):
    d = tmp_path / "ckpt"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config) if isinstance(config, str) else \
            (d / "config.json").write_bytes(config)
    for fname, tensors in shards.items():
        (d / fname).write_bytes(pack(tensors))
    return d


def test_folder_reads_all_shards(tmp_path):
    d = _folder(tmp_path, {
        "model-00001-of-00002.safetensors": {"x": np.ones(2)},
        "model-00002-of-00002.safetensors": {"y": np.zeros((1, 2), np.float32)},
    })
    cfg, t = read_checkpoint_folder(d, dtype=np.float64)
    assert cfg == {"model_type": "llama"}
    assert set(t) == {"x", "y"} and t["y"].dtype == np.float64


def test_folder_index_consistency(tmp_path):
    d = _folder(tmp_path, {"a.safetensors": {"x": np.ones(2)},
                           "b.safetensors": {"y": np.ones(2)}})
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    read_checkpoint_folder(d)
    idx.write_text(json.dumps({"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(ModelFileError, match="weight_map"):
        read_checkpoint_folder(d)
    idx.write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    with pytest.raises(ModelFileError, match="disagrees"):
        read_checkpoint_folder(d)


@pytest.mark.parametrize("config,pattern", [
    (None, "missing config.json"),
    ("{bad", "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    ("[1]", "must be a JSON object"),
    ('{"a": 1, "a": 2}', "duplicate key"),
])
def test_folder_bad_config(tmp_path, config, pattern):
    d = _folder(tmp_path, {"m.safetensors": {"x": np.ones(1)}}, config=config)
    with pytest.raises(ModelFileError, match=pattern):
        read_checkpoint_folder(d)


def test_folder_duplicate_across_shards(tmp_path):
    d = _folder(tmp_path, {"a.safetensors": {"x": np.ones(2)},
                           "b.safetensors": {"x": np.ones(2)}})
    with pytest.raises(ModelFileError, match="appears in both a.safetensors and b.safetensors"):
        read_checkpoint_folder(d)


def test_folder_without_weights_or_missing(tmp_path):
    d = _folder(tmp_path, {})
    with pytest.raises(ModelFileError, match="no \\*.safetensors"):
        read_checkpoint_folder(d)
    with pytest.raises(ModelFileError, match="no such directory"):
        read_checkpoint_folder(tmp_path / "absent")


def test_folder_bad_shard_propagates(tmp_path):
    d = _folder(tmp_path, {"a.safetensors": {"x": np.ones(2)}})
    (d / "b.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ModelFileError, match="b.safetensors"):
        read_checkpoint_folder(d)


# --------------------------------------------------------------------------- fuzzing
_BASE = pack({
    "w": np.arange(6, dtype=np.float64).reshape(2, 3),
    "h": ("BF16", [2], np.array([0x3F80, 0xC020], "<u2").tobytes()),
    "i": np.array([1, -2], dtype=np.int32),
    "m": np.array([True, False]),
}, metadata={"format": "pt"})

_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(_BASE))),
    st.tuples(st.just("flip"), st.integers(0, len(_BASE) - 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(_BASE)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(_BASE) - 1), st.integers(1, 8)),
    st.tuples(st.just("header_len"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("json_digit"), st.integers(0, 1000), st.sampled_from(b"0123456789-.e]}\"")),
)


def _apply(blob, m):
    """Apply one mutation; positions wrap around so they stay valid after earlier edits."""
    b = bytearray(blob)
    kind = m[0]
    if kind == "truncate":
        return bytes(b[: m[1]])
    if kind == "header_len":
        return struct.pack("<Q", m[1]) + bytes(b[8:])
    if kind == "insert":
        i = m[1] % (len(b) + 1)
        b[i:i] = m[2]
        return bytes(b)
    if not b:
        return b""
    i = m[1] % len(b)
    if kind == "flip":
        b[i] ^= m[2]
    elif kind == "delete":
        del b[i:i + m[2]]
    elif kind == "json_digit" and len(b) > 8:
        n = struct.unpack("<Q", bytes(b[:8]))[0]
        if 0 < n <= len(b) - 8:
            b[8 + m[1] % n] = m[2]
    return bytes(b)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_fuzz_loads_or_raises_model_file_error(mutations, tmp_path):
    blob = _BASE
    for m in mutations:
        blob = _apply(blob, m)
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        out = read_safetensors(p)
    except ModelFileError:
        return
    for name, arr in out.items():
        assert isinstance(name, str) and isinstance(arr, np.ndarray)
