"""Tables and figures of the condensation study, from its JSON (:func:`minipatch.condense_study.run_study`).

- :func:`summary`: per task and method, held-out first-token accuracy, exact match and KL to the
  10-shot model, mean and standard deviation over seeds, at every calibration size.
- :func:`tables`: the README's tables (Markdown): task x method at each method's best calibration
  size (chosen on one half of the held-out queries, reported on the other), and the means over
  tasks at every size.
- :func:`figure`: one panel per method, the fraction of the in-context gain recovered against the
  number of calibration queries, one line per task.
"""
from __future__ import annotations

import numpy as np

from .condense_study import ALL_VARIANTS, ONE_VARIANTS

METHODS = tuple(f"{v}/all" for v in ALL_VARIANTS) + tuple(f"{v}/one" for v in ONE_VARIANTS)
LABELS = {
    "vector/all": "T1 thought vector, all layers", "lstsq/all": "T2 least squares, all layers",
    "ridge/all": "T3 covariance ridge, all layers", "ridge-r1/all": "T4 rank 1 of T3, all layers",
    "ridge-r4/all": "T4 rank 4 of T3, all layers", "ridge-r16/all": "T4 rank 16 of T3, all layers",
    "vector/one": "T1 thought vector, best layer", "ridge/one": "T3 covariance ridge, best layer",
}
METRICS = ("first", "exact", "kl")


def _stat(values):
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _halves(runs, metric="first"):
    """Stats over seeds of the metric on the first half of each seed's held-out queries (where a
    calibration size may be selected) and on the second half (where it is then reported)."""
    h = len(runs[0][metric]) // 2
    return {metric + "_select": _stat([np.mean(r[metric][:h]) for r in runs]),
            metric + "_report": _stat([np.mean(r[metric][h:]) for r in runs])}


def summary(result):
    """{task: {"learned", "gain", "zero"/"icl5"/"icl10": {metric: stat}, "methods": {method: {size:
    {metric: stat, "layers": [...]}}}}}; a stat is mean, std (over seeds) and n."""
    out = {}
    for task, t in result["tasks"].items():
        seeds = list(t["seeds"].values())
        row = {"learned": t["learned"], "gain": t["gain"]}
        for base in seeds[0]["baselines"]:
            runs = [s["baselines"][base] for s in seeds]
            row[base] = {**{m: _stat([np.mean(r[m]) for r in runs]) for m in METRICS}, **_halves(runs)}
        if all("condense" in s for s in seeds):
            methods = {}
            for size in seeds[0]["condense"]["sizes"]:
                for meth in METHODS:
                    runs = [s["condense"]["sizes"][size][meth] for s in seeds]
                    cell = {**{m: _stat([np.mean(r[m]) for r in runs]) for m in METRICS}, **_halves(runs)}
                    if "layer" in runs[0]:
                        cell["layers"] = [r["layer"] for r in runs]
                    methods.setdefault(meth, {})[size] = cell
            row["methods"] = methods
            row["m7_rel_err"] = max(s["condense"]["m7_rel_err"] for s in seeds)
            row["m7_unpatched_rel_err"] = min(s["condense"]["m7_unpatched_rel_err"] for s in seeds)
            row["lstsq_max_rel_residual"] = max(s["condense"]["sizes"][z]["lstsq/all"]["max_rel_residual"]
                                               for s in seeds for z in s["condense"]["sizes"])
        out[task] = row
    return out


def best_size(cells):
    """The calibration size with the highest mean first-token accuracy on the selection half of
    the held-out queries (ties: the smaller); the tables report it on the other half."""
    return max(cells, key=lambda z: (cells[z]["first_select"]["mean"], -int(z)))


def recovered(acc, lo, hi):
    """(acc - lo) / (hi - lo): the fraction of the in-context gain recovered (NaN without a gain)."""
    return (acc - lo) / (hi - lo) if hi > lo else float("nan")


def _pct(stat):
    return f"{100 * stat['mean']:.0f} ± {100 * stat['std']:.0f}"


def tables(result):
    """The README tables (Markdown text), generated from the study's JSON."""
    s = summary(result)
    k, k5 = result["config"]["n_demos"], result["config"]["k_small"]
    big, small = f"icl{k}", f"icl{k5}"
    tasks = [t for t, r in s.items() if "methods" in r]
    head = "| method | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
    rows = [("zero-shot (floor)", [_pct(s[t]["zero"]["first_report"]) for t in tasks]),
            (f"in context, k = {k5}", [_pct(s[t][small]["first_report"]) for t in tasks]),
            (f"in context, k = {k} (ceiling)", [_pct(s[t][big]["first_report"]) for t in tasks])]
    for meth in METHODS:
        cells = []
        for t in tasks:
            z = best_size(s[t]["methods"][meth])
            cells.append(f"{_pct(s[t]['methods'][meth][z]['first_report'])} (n={z})")
        rows.append((LABELS[meth], cells))
    main = head + "".join(f"| {name} | " + " | ".join(c) + " |\n" for name, c in rows)
    sizes = sorted(s[tasks[0]]["methods"][METHODS[0]], key=int) if tasks else []
    means = (f"| mean over the {len(tasks)} tasks: first token (exact match) · KL to {k}-shot | "
             + " | ".join(f"n = {z}" for z in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n")

    def cell(stats):
        f, e, d = (np.mean([st[m]["mean"] for st in stats]) for m in METRICS)
        return f"{100 * f:.0f}% ({100 * e:.0f}%) · {d:.2f}"

    for name, key in (("zero-shot", "zero"), (f"in context, k = {k}", big)):
        means += f"| {name} | " + " | ".join(cell([s[t][key] for t in tasks]) for _ in sizes) + " |\n"
    for meth in METHODS:
        means += f"| {LABELS[meth]} | " + " | ".join(cell([s[t]["methods"][meth][z] for t in tasks])
                                                     for z in sizes) + " |\n"
    return main + "\n" + means + "\n" + notes(result, s, tasks, sizes)


def notes(result, s, tasks, sizes):
    """The generated sentences under the tables: learned tasks, T2's exactness and size, T3's ridge."""
    k = result["config"]["n_demos"]
    learned = ", ".join(f"{t} ({100 * s[t]['gain']:+.0f})" for t in tasks)
    skipped = ", ".join(f"{t} ({100 * r['gain']:+.0f})" for t, r in s.items() if t not in tasks)
    out = (f"Learned in context (gain of k = {k} over zero-shot, points): {learned}. "
           f"Not learned, not condensed: {skipped or 'none'}.")
    runs = [(z, seed["condense"]["sizes"][z]) for t in tasks for seed in result["tasks"][t]["seeds"].values()
            for z in sizes]
    if runs:
        worst = max(r["lstsq/all"]["max_rel_residual"] for _, r in runs)
        exact = all(r["lstsq/all"]["all_exact"] for _, r in runs)
        norm = {z: np.mean([r["lstsq/all"]["rel_norm"] for zz, r in runs if zz == z]) for z in sizes}
        small = np.mean([kp <= 1e-4 for z, r in runs if z == sizes[-1] for kp in r["ridge/all"]["kappas"]])
        tok = max(r["lstsq/all"]["tokens"] for _, r in runs)
        out += (f" T2 (all layers): {'every' if exact else 'not every'} fit had independent calibration inputs "
                f"(at most {tok} distinct tokens), worst relative residual {worst:.1e}; mean ||dW|| / ||W|| "
                + ", ".join(f"{norm[z]:.3f}" for z in sizes) + f" at n = {', '.join(sizes)}."
                f" T3's GCV chose kappa <= 1e-4 in {100 * small:.0f}% of its fits at n = {sizes[-1]}.")
    return out + "\n"


def figure(result, path):
    """One panel per method: held-out recovered gain (acc - zero) / (k10 - zero) against calibration
    queries, one line per task (mean, bars: standard deviation over seeds). Saved to ``path``."""
    import matplotlib.pyplot as plt

    s = summary(result)
    tasks = [t for t, r in s.items() if "methods" in r]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.8), sharex=True, sharey=True)
    for ax, meth in zip(axes.ravel(), METHODS):
        for i, t in enumerate(tasks):
            cells = s[t]["methods"][meth]
            sizes = sorted(cells, key=int)
            lo, hi = s[t]["zero"]["first"]["mean"], s[t][f"icl{result['config']['n_demos']}"]["first"]["mean"]
            if not hi > lo:
                continue
            y = [recovered(cells[z]["first"]["mean"], lo, hi) for z in sizes]
            e = [cells[z]["first"]["std"] / (hi - lo) for z in sizes]
            ax.errorbar([int(z) for z in sizes], y, yerr=e, marker="o", ms=3, lw=1.2, capsize=2,
                        color=f"C{i}", label=t)
        ax.axhline(0, color="k", lw=0.6, ls=":")
        ax.axhline(1, color="k", lw=0.6, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(LABELS[meth], fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("calibration queries n")
    for ax in axes[:, 0]:
        ax.set_ylabel("recovered in-context gain")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Held-out queries without demonstrations: 0 = zero-shot, 1 = 10-shot (Gemma 3 270M)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return fig


__all__ = ["METHODS", "LABELS", "summary", "best_size", "recovered", "tables", "notes", "figure"]
