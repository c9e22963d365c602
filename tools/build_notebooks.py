"""Build the read-along notebooks: execute each paired source and write its ``.ipynb``.

    python tools/build_notebooks.py            # every notebooks/NN_*.py -> NN_*.ipynb, executed
    python tools/build_notebooks.py 03         # only the notebooks whose name starts with 03

Each ``notebooks/NN_name.py`` is the jupytext "percent" source of ``NN_name.ipynb`` (the pair is
declared in the header of the ``.py``). The source is read with jupytext, executed with nbclient
(working directory ``notebooks/``), and written with its outputs, figures inline, to the
``.ipynb``. The build sets ``MINIPATCH_FIGURES`` to the committed ``figures/`` folder; a
notebook run by hand writes its figures to the ignored ``output/figures/`` instead.

``tests/test_notebooks.py`` re-executes every source and fails when a committed text output
differs from the fresh one (cells tagged ``volatile``, e.g. timings, excepted).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def sources(prefix=""):
    """The notebook sources notebooks/NN_*.py (optionally only those starting with ``prefix``)."""
    return [p for p in sorted(NB.glob(f"{prefix}*.py")) if p.name[:2].isdigit()]


def read(src):
    """The notebook of a percent-format source (jupytext), with a kernelspec, without outputs."""
    import jupytext

    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata["kernelspec"] = dict(KERNEL)
    for i, cell in enumerate(nb.cells):      # stable ids: a rebuild changes only what the code prints
        cell.id = f"cell-{i}"
    return nb


def execute(nb, workdir, timeout=900):
    """Run every cell of ``nb`` in place with ``workdir`` as the kernel's working directory."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL["name"], record_timing=False,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def build(src, figures=ROOT / "figures"):
    """Execute ``src`` and write the paired ``.ipynb`` beside it; figures go to ``figures``."""
    import jupytext

    os.environ["MINIPATCH_FIGURES"] = str(figures)
    os.environ.pop("MPLBACKEND", None)          # the kernel's inline backend shows the figures
    nb = execute(read(src), NB)
    out = src.with_suffix(".ipynb")
    jupytext.write(nb, out, fmt="ipynb")
    return out


def main(argv):
    prefix = argv[1] if len(argv) > 1 else ""
    for src in sources(prefix):
        print("building", src.name, flush=True)
        build(src)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
