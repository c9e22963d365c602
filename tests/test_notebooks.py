"""Every read-along notebook executes, and its committed ``.ipynb`` is current.

Each ``notebooks/NN_*.py`` (jupytext percent format, paired with ``NN_*.ipynb``) is read with
jupytext and executed with nbclient in a temporary copy of the repository layout: the kernel's
working directory is ``TMP/notebooks``, figures go to a fresh ``TMP/figures``
(``MINIPATCH_FIGURES``), and every other top-level entry of the repository is a symlink, so
relative paths such as ``../tests/fixtures`` resolve. The committed ``.ipynb`` and ``figures/``
are never touched. Then, against the committed ``.ipynb``:

- the cells (kind and source) are those of the ``.py``: the pair is in sync;
- every code cell not tagged ``volatile`` (timings) prints the same text, numbers within one
  significant digit (``helpers.text_differences``), and shows as many figures inline;
- the notebook writes every figure of its prefix that ``figures/`` holds.

A failing ``assert`` in a notebook fails here, so the notebooks are tests too.
Rebuild the committed notebooks with ``python tools/build_notebooks.py``.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from helpers import ROOT, text_differences

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
TIMEOUT = 600

pytestmark = pytest.mark.notebooks


def _build_tool():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text(cell):
    """What a code cell printed: stdout, results and displays as text (stderr left out)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] == "stdout":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "".join(parts)


def _images(cell):
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_every_source_has_its_notebook():
    stems = {p.stem for p in NOTEBOOKS}
    assert len(stems) >= 9
    assert stems == {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}


PARAMS = [pytest.param(p, id=p.stem, marks=[pytest.mark.real] if "real" in p.stem else [])
          for p in NOTEBOOKS]


@pytest.mark.parametrize("src", PARAMS)
def test_notebook_executes_and_is_current(src, tmp_path, monkeypatch):
    import jupytext
    import nbformat

    from nbclient.exceptions import CellExecutionError

    build = _build_tool()
    nb = build.read(src)
    assert any(c.cell_type == "code" for c in nb.cells), f"{src.name} has no code cell"
    figures, workdir = tmp_path / "figures", tmp_path / "notebooks"
    figures.mkdir()
    workdir.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("figures", "notebooks", "output") and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    monkeypatch.setenv("MINIPATCH_FIGURES", str(figures))
    # the kernel must import this checkout's minipatch even without `pip install -e .`
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)      # the kernel's inline backend shows figures
    try:
        build.execute(nb, workdir, timeout=TIMEOUT)
    except CellExecutionError as e:   # show the notebook's own traceback, not nbclient's
        pytest.fail(f"{src.name} failed:\n{e}", pytrace=False)
    nbformat.validate(nb)

    committed = jupytext.read(src.with_suffix(".ipynb"))
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in nb.cells], \
        f"{src.stem}.ipynb is not built from {src.name}: run python tools/build_notebooks.py {src.name[:2]}"
    stale = []
    for i, (old, new) in enumerate(zip(committed.cells, nb.cells)):
        if new.cell_type != "code" or "volatile" in new.metadata.get("tags", []):
            continue
        diff = text_differences(_text(old), _text(new))
        if diff:
            stale.append(f"cell {i}: committed vs fresh {diff}")
        if _images(old) != _images(new):
            stale.append(f"cell {i}: {_images(old)} figures committed, {_images(new)} fresh")
    assert not stale, (f"{src.stem}.ipynb is stale (python tools/build_notebooks.py {src.name[:2]}):\n"
                       + "\n".join(stale))

    prefix = src.name[:2]
    made = {p.name for p in figures.glob(f"{prefix}_*.png")}
    kept = {p.name for p in (ROOT / "figures").glob(f"{prefix}_*.png")}
    assert made >= kept, f"{src.name} did not write {sorted(kept - made)}"
    assert made <= kept, f"{src.name} writes {sorted(made - kept)}, which figures/ lacks: rebuild"
    assert sum(_images(c) for c in nb.cells) >= len(made), f"{src.name} saves figures it does not show"


def test_freshness_check_catches_a_stale_number():
    """Negative control for the comparison above."""
    assert text_differences("M6d float32: 4.5e-06\n", "M6d float32: 4.7e-06\n") == []
    assert text_differences("M6d float32: 1.4e-06\n", "M6d float32: 4.5e-06\n") != []
    assert text_differences("auto -> m6c\n", "auto -> m6d\n") != []
