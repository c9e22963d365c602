"""Build the read-along notebooks from their paired sources and execute them.

    python tools/build_notebooks.py            # every notebooks/NN_*.py -> .ipynb, executed
    python tools/build_notebooks.py 03         # only notebooks whose name starts with 03

Each ``notebooks/NN_name.py`` is in the "percent" format: ``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell whose lines are ``# ``-prefixed. The executed
``.ipynb`` (with outputs) is written beside it; figures go to ``figures/``. Notebooks run
with ``notebooks/`` as working
directory, so they write figures to ``../figures``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


def parse(text):
    """Cells of a percent-format source: list of (kind, source)."""
    cells, kind, buf = [], None, []

    def flush():
        if kind is not None:
            src = "\n".join(buf).strip("\n")
            if src:
                cells.append((kind, src))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, buf = ("markdown" if "[markdown]" in line else "code"), []
            continue
        if kind is None:   # header before the first cell marker (e.g. a docstring): skip
            continue
        if kind == "markdown":
            line = line[2:] if line.startswith("# ") else ("" if line == "#" else line)
        buf.append(line)
    flush()
    return cells


def build(src, execute=True, timeout=900):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = [new_markdown_cell(s) if k == "markdown" else new_code_cell(s) for k, s in parse(src.read_text())]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    if execute:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NB)}}).execute()
    out = src.with_suffix(".ipynb")
    nbformat.write(nb, out)
    return out


def main(argv):
    prefix = argv[1] if len(argv) > 1 else ""
    for src in sorted(NB.glob(f"{prefix}*.py")):
        if src.name[:2].isdigit():
            print("building", src.name, flush=True)
            build(src)


if __name__ == "__main__":
    main(sys.argv)
