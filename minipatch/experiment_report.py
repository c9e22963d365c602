"""Reporting of the section-4 generation experiment (MATH.md M6, M7): a Markdown table and a figure.

:func:`format_table` and :func:`plot` read what :func:`~minipatch.experiment.run_experiment`
returns (its ``summary`` and ``runs``); :mod:`minipatch.experiment` re-exports both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def format_table(summary):
    """Markdown table: per dtype x order x method, token agreement, logit errors, largest scale patch."""
    lines = ["| dtype | M7 order | method | tokens agree | agree before first divergence | max abs logit err | "
             "mean abs logit err | max rel err | largest scale patch |", "|---|---|---|---|---|---|---|---|---|"]
    f = (lambda v: "—" if v is None else f"{v:.2g}")
    for s in summary.values():
        if s["errors"] and s["max_abs_err"] is None:
            lines.append(f"| {s['dtype']} | {s.get('order', 'closed')} | {s['method'].upper()} | no witness "
                         f"({s['errors']} prompts) | — | — | — | — | — |")
            continue
        lines.append(f"| {s['dtype']} | {s.get('order', 'closed')} | {s['method'].upper()} | {s['agree']}/{s['total']} | "
                     f"{s['prefix_agree']}/{s['total']} | {f(s['max_abs_err'])} | {f(s['mean_abs_err'])} | "
                     f"{f(s['max_rel_err'])} | {f(s.get('largest_scale'))} |")
    return "\n".join(lines)


def plot(result, path):
    """Per-step max |logit error| (log scale), one panel per dtype, one colour per method;
    crosses mark the step where a prompt's tokens first disagree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("error") is None]
    dtypes = list(dict.fromkeys(r["dtype"] for r in runs))
    orders = list(dict.fromkeys(r.get("order", "closed") for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    fig, axes = plt.subplots(len(orders), len(dtypes), figsize=(4.2 * len(dtypes), 3.2 * len(orders)),
                             squeeze=False, sharey=True)
    colors = dict(zip(methods, ["C0", "C4", "C3", "C2", "C1"]))
    for (i, order), (j, dt) in ((a, b) for a in enumerate(orders) for b in enumerate(dtypes)):
        ax = axes[i][j]
        for r in (r for r in runs if r["dtype"] == dt and r.get("order", "closed") == order):
            e = np.maximum(np.asarray(r["abs_err"]), 1e-17)
            c = colors[r["method"]]
            lab = r["method"].upper() if r["prompt"] == 0 else None
            ax.semilogy(np.arange(e.size), e, "-", color=c, alpha=0.7, lw=1, marker=".", ms=3, label=lab)
            if r["first_divergence"] is not None and e.size:
                ax.semilogy([r["first_divergence"]], [e[-1]], "x", color=c, ms=9, mew=2)
        ax.set_title(f"{dt}, {order} loop", fontsize=9)
        ax.set_xlabel("generation step")
        ax.grid(alpha=0.3)
    for i in range(len(orders)):
        axes[i][0].set_ylabel("max |patched - with-context| logit")
    axes[0][0].legend(title="× first token disagreement", fontsize=8, title_fontsize=7)
    fig.suptitle("Only the current token, context absorbed into patches (M7), greedy", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


__all__ = ["format_table", "plot"]
