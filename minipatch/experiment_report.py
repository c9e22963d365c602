"""Reporting of the section-4 generation experiment (MATH.md M6, M7): a Markdown table and a figure.

:func:`format_table` and :func:`plot` read what :func:`~minipatch.experiment.run_experiment`
returns (its ``summary`` and ``runs``); :mod:`minipatch.experiment` re-exports both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def format_table(summary):
    """Markdown table: per dtype x method, token agreement, max and mean logit error."""
    lines = ["| dtype | method | tokens agree | agree before first divergence | max abs logit err | "
             "mean abs logit err | max rel err |", "|---|---|---|---|---|---|---|"]
    for s in summary.values():
        f = (lambda v: "—" if v is None else f"{v:.2e}")
        lines.append(f"| {s['dtype']} | {s['method'].upper()} | {s['agree']}/{s['total']} | "
                     f"{s['prefix_agree']}/{s['total']} | {f(s['max_abs_err'])} | {f(s['mean_abs_err'])} | "
                     f"{f(s['max_rel_err'])} |")
    return "\n".join(lines)


def plot(result, path):
    """Per-step max |logit error| (log scale), one panel per dtype, one colour per method;
    crosses mark the step where a prompt's tokens first disagree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in result["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.4), squeeze=False)
    colors = dict(zip(methods, ["C0", "C3", "C2", "C1"]))
    for ax, dt in zip(axes[0], dtypes):
        for r in (r for r in result["runs"] if r["dtype"] == dt):
            e = np.maximum(np.asarray(r["abs_err"]), 1e-17)
            c = colors[r["method"]]
            lab = r["method"].upper() if r["prompt"] == 0 else None
            ax.semilogy(np.arange(e.size), e, "-", color=c, alpha=0.7, lw=1, marker=".", ms=3, label=lab)
            if r["first_divergence"] is not None and e.size:
                ax.semilogy([r["first_divergence"]], [e[-1]], "x", color=c, ms=9, mew=2)
        ax.set_title(dt)
        ax.set_xlabel("generation step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("max |patched - with-context| logit")
    axes[0][0].legend(title="× first token disagreement", fontsize=8, title_fontsize=7)
    fig.suptitle("Only the current token, context absorbed into patches (M7), greedy", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


__all__ = ["format_table", "plot"]
