"""The README's "Auditing" section prints what the code prints (the convention of test_readme.py).

- the two commands from a Hugging Face checkpoint to a sublayer verdict (``reference --stock``,
  then ``audit``): the quoted report line and the numbers of the prose, the stock reference made
  in a child process with AVX2 kernels pinned (``ATEN_CPU_CAPABILITY=avx2``, as the README says);
- the true-float64 claim (every sublayer to rounding);
- the two ``verify-patches`` commands: their exit status, the quoted verdicts and numbers;
- the committed patch fixtures are what tools/make_patch_fixtures.py builds today.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, load_npz, number_agrees, text_differences
from minipatch.__main__ import main

pytestmark = pytest.mark.audit
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## Auditing"):README.index("## Backends")]


def commands(prefix):
    return [shlex.split(line.strip()) for line in SECTION.splitlines() if line.strip().startswith(prefix)]


def quoted(marker):
    """The ```text lines of the section that contain ``marker``."""
    blocks = re.findall(r"^```text\n(.*?)^```$", SECTION, re.S | re.M)
    return [line for b in blocks for line in b.splitlines() if marker in line]


def claim(pattern):
    m = re.search(pattern, SECTION)
    assert m, pattern
    return m.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory where the README's relative paths resolve (tests/ is the repository's)."""
    d = tmp_path_factory.mktemp("readme")
    (d / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    return d


def test_two_commands_to_a_sublayer_verdict(workdir, capsys, monkeypatch):
    pytest.importorskip("torch", reason='needs torch and transformers: pip install -e ".[hf]"')
    (ref_cmd,), (audit_cmd,) = commands("python -m minipatch reference"), \
        [c for c in commands("python -m minipatch audit") if "output/" in " ".join(c)]
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *ref_cmd[1:]], cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "stock-float64" in done.stdout and "Gemma3RMSNorm: float (x50)" in done.stdout
    monkeypatch.chdir(workdir)
    rc = main(audit_cmd[3:])
    out = capsys.readouterr().out
    assert rc == 1
    (line,) = quoted("first divergent sublayer")
    fresh = [l for l in out.splitlines() if "first divergent sublayer" in l]
    assert fresh and text_differences(line.strip(), fresh[0].strip()) == [], (line, fresh)
    rc = main(audit_cmd[3:] + ["--json"])
    r = json.loads(capsys.readouterr().out)
    assert number_agrees(claim(r"wrong from the\s+first layer's input norm on, by ([0-9.e+-]+)"), f"{r['sublayer_rel_err']:.1e}")


def test_true_float64_claim(workdir, capsys, monkeypatch):
    pytest.importorskip("torch", reason='needs torch and transformers: pip install -e ".[hf]"')
    (ref_cmd,) = commands("python -m minipatch reference")
    monkeypatch.chdir(workdir)
    argv = [a for a in ref_cmd[3:] if a != "--stock"]
    argv[argv.index("--out") + 1] = "output/gemma3_true.npz"
    assert main(argv + ["--json"]) == 0
    capsys.readouterr()
    rc = main(["audit", "tests/fixtures/gemma3_text", "--reference", "output/gemma3_true.npz", "--rtol", "1e-12",
               "--json"])
    r = json.loads(capsys.readouterr().out)
    worst = max(max(v) for v in r["sublayer_rel_errs"].values())
    assert rc == 0 and r["ok"] and worst <= 1e-12
    assert number_agrees(claim(r"the Gemma 3 one above: ([0-9.e+-]+)\)"), f"{worst:.1e}")


def test_verify_patches_commands(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    flawed, good = commands("python -m minipatch verify-patches")
    verdicts = quoted("verdict:")
    assert len(verdicts) == 2
    rc = main(flawed[3:])
    out = capsys.readouterr().out
    assert rc == 1 and verdicts[0].strip() in out
    rc = main(flawed[3:] + ["--json"])
    r = json.loads(capsys.readouterr().out)
    assert number_agrees(claim(r"MLP hidden \(([0-9.e+-]+)\)"), f"{r['sublayer_rel_err_before']:.1e}")
    assert number_agrees(claim(r"then off\s+by ([0-9.e+-]+) at the post-MLP norm"), f"{r['sublayer_rel_err']:.1e}")
    rc = main(good[3:])
    assert rc == 0 and verdicts[1].strip() in capsys.readouterr().out


def test_patch_fixtures_are_current():
    """tools/make_patch_fixtures.py rebuilds the committed patch files (to float64 rounding)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_patch_fixtures", ROOT / "tools" / "make_patch_fixtures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in tool.FILES:
        patches, ids, ctx = tool.build(name)
        committed = load_npz(tool.FOLDER / name)
        fresh = {}
        for l, lp in enumerate(patches.layers):
            for k, p in lp.items():
                for f, a in (("u", getattr(p, "u", None)), ("v", getattr(p, "v", None)),
                             ("add", getattr(p, "add", None))):
                    if a is not None:
                        fresh[f"layers.{l}.{k}.{f}"] = np.asarray(a)
        assert set(fresh) == {k for k in committed if k.startswith("layers.")}
        for k, a in fresh.items():
            assert np.max(np.abs(a - committed[k])) <= 1e-12 * np.max(np.abs(committed[k])), (name, k)
        assert np.array_equal(committed["input_ids"], ids) and np.array_equal(committed["context"], ctx)
