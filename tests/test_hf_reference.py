"""``python -m minipatch reference``: Hugging Face transformers made into a reference file, on every fixture.

True float64 (the default) must equal the committed true-float64 ``reference.npz`` of each fixture
and minipatch's forward, every hidden state and sublayer, to <= 1e-12; ``--stock`` must differ by
~1e-7 exactly where transformers has float32 islands (none for GPT-2), and the audit must then
name layer 0's input norm (or, without one, the first sublayer that normalizes or rotates) as the
first diverging sublayer. Failure paths: exit status 2 with a named error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import FIXTURES, TOL64_BLOCK, load_npz, rel_err
from minipatch.__main__ import main
from minipatch.audit import audit, read_reference
from minipatch.errors import MissingDependencyError, ModelFileError, UnsupportedArchitectureError

pytestmark = pytest.mark.audit
torch = pytest.importorskip("torch", reason='needs torch and transformers: pip install -e ".[hf]"')
pytest.importorskip("transformers", reason='needs torch and transformers: pip install -e ".[hf]"')
torch.set_num_threads(1)

from minipatch.hf_reference import SUBLAYER_HOOKS, make_reference  # noqa: E402
from minipatch.npzfile import write_npz  # noqa: E402

FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "model.safetensors").exists())


def test_every_fixture_family_has_hooks():
    assert len(FAMILIES) >= 13
    for name in FAMILIES:
        assert json.loads((FIXTURES / name / "config.json").read_text())["model_type"] in SUBLAYER_HOOKS


@pytest.fixture(scope="module", params=FAMILIES)
def made(request, tmp_path_factory):
    """(fixture name, committed reference, true-float64 arrays, stock arrays, written true file)."""
    name = request.param
    folder = FIXTURES / name
    ref = load_npz(folder / "reference.npz")
    true = make_reference(folder, ref["input_ids"], context=ref["context_positions"])
    stock = make_reference(folder, ref["input_ids"], stock=True)
    path = write_npz(tmp_path_factory.mktemp(name) / "ref.npz", true)
    return name, ref, true, stock, path


def test_true_float64_equals_the_committed_reference(made):
    """Raising every float32 request gives the fixture's true-float64 run (made by runtime patches)."""
    name, ref, true, _, _ = made
    assert str(true["reference_kind"]) == "true-float64"
    assert np.array_equal(true["input_ids"], ref["input_ids"])
    assert rel_err(true["logits"], ref["logits"]) <= TOL64_BLOCK
    for got, want in zip(true["hidden_states"], ref["hidden_states"]):
        assert rel_err(got, want) <= TOL64_BLOCK
    assert true["logits"].dtype == np.float64 and true["hidden_states"].shape == ref["hidden_states"].shape


def test_audit_of_it_passes_every_sublayer_at_1e12(made):
    """minipatch's forward agrees with the Hugging Face reference sublayer by sublayer (<= 1e-12)."""
    name, ref, true, _, path = made
    r = audit(FIXTURES / name, path, rtol=1e-12)
    assert r["ok"] is True and r["first_divergent_sublayer"] is None and r["first_divergent_layer"] is None
    table = r["sublayer_rel_errs"]
    assert {"attn_out", "mlp_in", "mlp_out", "out"} <= set(table) and max(max(v) for v in table.values()) <= 1e-12
    assert set(table) == {k.split(".", 1)[1] for k in true if k.startswith("sublayers.")}
    assert r["absorb_max_rel_err_reference"] <= 1e-12 and r["unpatched_max_rel_err"] > 1e-3


def test_stock_differs_where_hugging_face_has_float32_islands(made):
    name, ref, true, stock, _ = made
    err = rel_err(stock["logits"], true["logits"])
    islands = " ".join(str(s) for s in stock["islands"])
    assert str(stock["reference_kind"]) == "stock-float64"
    if name == "gpt2":     # LayerNorm, gelu_new and GPT-2's softmax stay in the input dtype
        assert err == 0.0 and islands == "" and len(true["islands"]) == 0
    else:
        assert 1e-8 < err < 1e-5, (name, err)
        assert list(stock["islands"]) == list(true["islands"])    # found there, raised here
        assert ("Attention" in islands and ("RMSNorm" in islands or "Rotary" in islands or "GPTJ" in islands))


def test_stock_gemma3_diverges_first_at_layer_0_input_norm(tmp_path, capsys):
    """The finding of the worked audit: stock HF Gemma 3 in float64 is exact up to the embeddings
    and first wrong at the first layer's input norm (RMSNorm in float32)."""
    folder = FIXTURES / "gemma3_text"
    ids = ",".join(str(i) for i in load_npz(folder / "reference.npz")["input_ids"])
    out = tmp_path / "stock.npz"
    assert main(["reference", str(folder), "--out", str(out), "--tokens", ids, "--stock", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["reference_kind"] == "stock-float64" and "Gemma3RMSNorm: float (x50)" in made["islands"]
    rc = main(["audit", str(folder), "--reference", str(out), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 1 and r["first_divergent_sublayer"] == {"layer": 0, "sublayer": "attn_norm"}
    assert 1e-9 < r["sublayer_rel_err"] < 1e-6
    assert r["sublayer_before"] == {"layer": None, "sublayer": "embeddings"} and r["sublayer_rel_err_before"] == 0.0
    assert any("stock Hugging Face in float64" in n for n in r["notes"])
    rc = main(["audit", str(folder), "--reference", str(out)])
    text = capsys.readouterr().out
    assert rc == 1 and "first divergent sublayer: layer 0 attn_norm (the attention's input norm)" in text
    assert main(["audit", str(folder), "--reference", str(out), "--rtol", "1e-5", "--json"]) == 0
    capsys.readouterr()


def test_cli_two_commands_to_a_verdict(tmp_path, capsys):
    """reference then audit: an auditor with only a checkpoint reaches a sublayer verdict."""
    folder = FIXTURES / "llama"
    out = tmp_path / "ref.npz"
    rc = main(["reference", str(folder), "--out", str(out), "--tokens", "1,45,7,99,12,5,77", "--context", "1:3"])
    text = capsys.readouterr().out
    assert rc == 0 and f"wrote {out} (true-float64)" in text and "LlamaRMSNorm" in text and "next: python" in text
    assert np.array_equal(read_reference(out)["context_positions"], [1, 2])
    rc = main(["audit", str(folder), "--reference", str(out), "--rtol", "1e-12", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["ok"] and r["first_divergent_sublayer"] is None and r["sublayer_rel_err"] is None
    assert r["absorb_max_rel_err_self"] <= 1e-12


def test_float32_reference_and_hf_batch_layout_get_hints(tmp_path, capsys):
    """A stock float32 reference in Hugging Face's [1, T] layout is read, and the report says
    which --rtol fits it."""
    folder = FIXTURES / "mistral"
    ref = load_npz(folder / "reference.npz")
    arrays = make_reference(folder, ref["input_ids"], dtype="float32")
    assert arrays["logits"].dtype == np.float32 and str(arrays["reference_kind"]) == "stock-float32"
    batched = {k: (v[None] if k in ("input_ids", "logits") else v[:, None] if k == "hidden_states" or
                   k.startswith("sublayers.") else v) for k, v in arrays.items()}
    path = write_npz(tmp_path / "f32.npz", batched)
    rc = main(["audit", str(folder), "--reference", str(path), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 1 and r["first_divergent_sublayer"]["layer"] == 0
    assert any("batch of one" in n for n in r["notes"]) and any("--rtol 1e-4" in n for n in r["notes"])
    rc = main(["audit", str(folder), "--reference", str(path), "--rtol", "1e-4", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["ok"]


# --------------------------------------------------------------------------- failure paths


@pytest.mark.parametrize("case", ["no folder", "gguf", "no config", "unsupported", "ids out of vocab",
                                  "bad context", "bad tokens", "prompt without tokenizer", "float tokens file"])
def test_reference_failures_are_named_exit_2(case, tmp_path, capsys):
    folder = FIXTURES / "llama"
    args = {"no folder": [str(tmp_path / "nope"), "--tokens", "1,2"],
            "gguf": [str(tmp_path / "m.gguf"), "--tokens", "1,2"],
            "no config": [str(tmp_path), "--tokens", "1,2"],
            "unsupported": [str(tmp_path), "--tokens", "1,2"],
            "ids out of vocab": [str(folder), "--tokens", "1,500"],
            "bad context": [str(folder), "--tokens", "1,2,3", "--context", "1:x"],
            "bad tokens": [str(folder), "--tokens", "1,two"],
            "prompt without tokenizer": [str(folder), "--prompt", "hello"],
            "float tokens file": [str(folder), "--tokens", str(tmp_path / "t.npz")]}[case]
    message = {"no folder": "checkpoint folder", "gguf": "checkpoint folder", "no config": "no config.json",
               "unsupported": "has no reference hooks", "ids out of vocab": "token ids must lie in [0, 128)",
               "bad context": "--context must be", "bad tokens": "--tokens must be",
               "prompt without tokenizer": "no usable tokenizer", "float tokens file": "integer"}[case]
    if case == "unsupported":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if case == "gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF")
    if case == "float tokens file":
        np.savez(tmp_path / "t.npz", input_ids=np.array([1.5, 2.0]))
    out = tmp_path / "out.npz"
    rc = main(["reference", *args, "--out", str(out), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 2 and r["ok"] is False and message in r["error"] and not out.exists()
    rc = main(["reference", *args, "--out", str(out)])
    assert rc == 2 and capsys.readouterr().err.startswith("reference failed: ")


def test_unsupported_and_missing_extra_are_named(monkeypatch, tmp_path):
    with pytest.raises(UnsupportedArchitectureError):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
        make_reference(tmp_path, [1, 2])
    import builtins

    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name in ("torch", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[hf\]"'):
        make_reference(FIXTURES / "llama", [1, 2])
    assert issubclass(MissingDependencyError, ImportError)


def test_package_import_does_not_import_torch():
    """torch stays optional: importing minipatch (and its CLI) never imports it."""
    import subprocess
    import sys

    code = "import sys, minipatch, minipatch.__main__, minipatch.audit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_corrupt_checkpoint_is_a_model_file_error(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "llama", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelFileError):
        make_reference(tmp_path / "m", [1, 2])
