"""The main job, ``python -m minipatch``: it runs, passes, and writes its figure."""
import re

import pytest

from minipatch.__main__ import main


@pytest.mark.m7
def test_main_quick(tmp_path, capsys):
    assert main(["--quick", "--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "M7 through 12 layers" in out and "m6c" in out and "m6d" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(tuple(f"{n} passed, 0 failed, " for n in range(1, 100))), last
    assert " 2 info (expected to fail" in last     # M6a built in open loop through 12 layers (MATH.md M7)
    verdicts = re.findall(r" (pass|FAIL|info) \(bar ", out)
    assert verdicts.count("info") == 2 and verdicts.count("pass") >= 20 and "FAIL" not in verdicts
    assert (tmp_path / "error_per_layer.png").stat().st_size > 1000


def test_main_default_figure_dir_is_ignored(tmp_path, monkeypatch, capsys):
    """Without --figures the figure goes to output/figures (ignored by .gitignore)."""
    from helpers import ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIPATCH_FIGURES", raising=False)
    assert main(["--quick"]) == 0
    assert (tmp_path / "output" / "figures" / "error_per_layer.png").exists()
    assert "output/" in (ROOT / ".gitignore").read_text().splitlines()


def test_main_reports_failure(monkeypatch, tmp_path, capsys):
    """A failing check makes the main job exit non-zero (the check is not vacuous)."""
    from minipatch.cli import report

    monkeypatch.setitem(report.BAR, ("model", "float64"), 1e-30)
    assert main(["--quick", "--figures", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and " 0 failed" not in out.splitlines()[-1]
