"""Where figures go, and showing one: the helpers the read-along notebooks share.

Figures are written to ``$MINIPATCH_FIGURES`` (``tools/build_notebooks.py`` sets it to the
committed ``figures/``), else to ``output/figures`` beside the notebooks (ignored by git), so
running a notebook by hand leaves a clone clean. Needs matplotlib (the ``[plot]`` extra).
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path("..") / "output" / "figures"     # relative to notebooks/, the kernel's working folder


def figures_dir():
    """The folder figures are written to (created if missing)."""
    folder = Path(os.environ.get("MINIPATCH_FIGURES", DEFAULT))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def show(fig, name):
    """Save ``fig`` as ``figures_dir()/name`` (byte-stable: no software stamp) and display it
    inline. Returns None, so a cell ending in ``show(...)`` prints nothing more."""
    import matplotlib.pyplot as plt

    fig.savefig(figures_dir() / name, dpi=110, metadata={"Software": None})
    plt.show()
