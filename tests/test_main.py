"""The main job, ``python -m minipatch``: it runs, passes, and writes its figure."""
import pytest

from minipatch.__main__ import main


@pytest.mark.m7
def test_main_quick(tmp_path, capsys):
    assert main(["--quick", "--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "M7 through 12 layers" in out and "m6c" in out and "0 failed" in out
    assert (tmp_path / "error_per_layer.png").stat().st_size > 1000


def test_main_reports_failure(monkeypatch, tmp_path, capsys):
    """A failing check makes the main job exit non-zero (the check is not vacuous)."""
    from minipatch import report

    monkeypatch.setitem(report.BAR, ("model", "float64"), 1e-30)
    assert main(["--quick", "--figures", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out
