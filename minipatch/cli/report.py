"""The checks behind ``python -m minipatch``: every theorem on embedded random models.

Each check returns a :class:`Row`: the max relative error of the patched model without
context against the model with context, the same error without patches (the negative
control, which must be large), the patch rank, the time of ``absorb``, and a verdict
against the bar of MATH.md section 8 (float64: 1e-12 per block, 1e-10 through a model;
float32: 1e-4). Each row's verdict is ``pass``, ``FAIL`` or ``info``: an ``info`` row is a
measurement where the construction is expected to miss the bar because a documented
precondition does not hold (M6a's scale patch amplifies rounding where ``u^C`` has tiny
coordinates, MATH.md M6a); it is reported, never counted as passed or failed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import models
from ..absorb import absorb, check_block, patched_forward
from ..decode import greedy
from ..backend import to_numpy
from ..lemmas import m1, m2
from ..patches import Rank1
from ..metrics import rel_err

BAR = {("block", "float64"): 1e-12, ("model", "float64"): 1e-10,
       ("block", "float32"): 1e-4, ("model", "float32"): 1e-4}
CONTROL_MIN = 1e-3


@dataclass
class Row:
    check: str
    model: str
    method: str
    dtype: str
    err: float
    control: float
    rank: int
    seconds: float
    bar: float
    info: bool = False
    note: str = ""

    @property
    def ok(self):
        """Meets the bar with a large enough negative control (info rows are never failures)."""
        if self.info:
            return True
        return self.err <= self.bar and (np.isnan(self.control) or self.control > CONTROL_MIN)

    @property
    def verdict(self):
        """'pass', 'FAIL' or 'info' (expected to fail: documented precondition)."""
        return "info" if self.info else ("pass" if self.ok else "FAIL")




def max_rank(patch_layers, rows=(0, -1)):
    """Largest matrix rank among the dense patches of a few kept tokens (1 for rank-1 patches)."""
    r = 0
    for lp in patch_layers:
        for p in lp.values():
            if isinstance(p, Rank1):
                for t in rows:
                    d = to_numpy(p.dense(t))
                    d = d.reshape(-1, d.shape[-2], d.shape[-1])
                    r = max(r, max(int(np.linalg.matrix_rank(x)) for x in d))
    return r


def lemma_rows(dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype(dtype) / np.sqrt(32)
    a, a2 = rng.standard_normal((16, 32)).astype(dtype), rng.standard_normal((16, 32)).astype(dtype)
    bar = BAR[("block", np.dtype(dtype).name)]
    t = time.perf_counter()
    p = m1(w, a, a2)
    s1 = time.perf_counter() - t
    out = [Row("M1 input absorption", "random 48x32", "m1", np.dtype(dtype).name,
               rel_err(p.apply(a, a @ w.T), a2 @ w.T), rel_err(a @ w.T, a2 @ w.T), max_rank([{"w": p}]), s1, bar)]
    delta = rng.standard_normal((16, 48)).astype(dtype)
    t = time.perf_counter()
    q = m2(a, delta)
    s2 = time.perf_counter() - t
    out.append(Row("M2 output absorption", "random 48x32", "m2", np.dtype(dtype).name,
                   rel_err(q.apply(a, a @ w.T), a @ w.T + delta), rel_err(a @ w.T, a @ w.T + delta),
                   max_rank([{"w": q}]), s2, bar))
    return out


def context_for(T, seed):
    """A non-prefix context: a random half of positions 1..T-2 (BOS and the last token kept)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(1, T - 1), (T - 2) // 2 + 1, replace=False))


def block_rows(model, name, method, T=24, seed=0):
    """The block theorem at every layer (M6 for Gemma, M8 otherwise): the worst block."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, model.cfg.vocab_size, T)
    ctx = context_for(T, seed)
    tr = {}
    model.run(tok, trace=tr, head=False)
    errs, ctrl, rank, secs, used = [], [], 0, 0.0, set()
    for l in range(model.cfg.n_layers):
        t = time.perf_counter()
        r = check_block(model, l, tr["layers"][l]["x"], ctx, method)
        secs += time.perf_counter() - t
        errs.append(rel_err(r.patched, r.with_context))
        ctrl.append(rel_err(r.unpatched, r.with_context))
        rank = max(rank, max_rank([r.patch]))
        used.add(r.method)
    dt = np.dtype(model.dtype).name
    return Row("block theorem (worst layer)", name, "/".join(sorted(used)), dt, max(errs), min(ctrl), rank,
               secs, BAR[("block", dt)])


def model_row(model, name, method, T=32, seed=0, info=False, trace_out=None, order="closed"):
    """M7 through the whole model (``order``: MATH.md M7's order of construction);
    optionally collects the per-layer stream errors."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, model.cfg.vocab_size, T)
    ctx = context_for(T, seed)
    t = time.perf_counter()
    res = absorb(model, tok, ctx, method=method, order=order)
    secs = time.perf_counter() - t
    full_tr, pt_tr, un_tr = {}, {}, {}
    full = to_numpy(model.forward(tok, trace=full_tr))[res.kept]
    patched = patched_forward(model, tok, res, trace=pt_tr)
    unpatched = model.forward(tok[res.kept], positions=res.kept, trace=un_tr)
    if trace_out is not None:
        K = res.kept
        hs = [to_numpy(h)[K] for h in full_tr["hidden_states"]]
        trace_out[method] = [rel_err(to_numpy(p), h) for p, h in zip(pt_tr["hidden_states"], hs)]
        trace_out["unpatched"] = [rel_err(to_numpy(p), h) for p, h in zip(un_tr["hidden_states"], hs)]
    dt = np.dtype(model.dtype).name
    used = "/".join(sorted(set(res.methods)))
    used = used if method in ("auto", used) else f"{method}->{used}"
    used = f"auto->{used}" if method == "auto" else used
    used = used if order == "closed" else f"{used}/open"
    return Row(f"M7 through {model.cfg.n_layers} layers", name, used, dt, rel_err(patched, full),
               rel_err(unpatched, full), max_rank(res.patches.layers), secs, BAR[("model", dt)], info=info)


def greedy_row(model, name, n_new=8):
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, model.cfg.vocab_size, 10)
    t = time.perf_counter()
    want, lw = greedy(model, prompt, n_new)
    got, lg = greedy(model, prompt, n_new, context=np.arange(1, 8), method="auto")
    secs = time.perf_counter() - t
    same = bool(np.array_equal(want, got))
    dt = np.dtype(model.dtype).name
    return Row(f"greedy generation, {n_new} tokens", name, "auto", dt, rel_err(lg, lw) if same else np.inf,
               np.nan, 1, secs, BAR[("model", dt)], note="identical tokens" if same else "TOKENS DIFFER")


def gemma_rows(curves=None):
    """M1, M2, M6a/b/c/d per block, M7 through 12 layers, generation."""
    rows = []
    for dt in (np.float64, np.float32):
        rows += lemma_rows(dt)
        m4 = models.tiny_gemma(seed=0, dtype=dt)
        m12 = models.tiny_gemma(seed=0, dtype=dt, n_layers=12)
        for method in ("m6a", "m6b", "m6c", "m6d"):
            rows.append(block_rows(m4, "tiny_gemma L4", method))
        rows.append(model_row(m4, "tiny_gemma L4", "m6a"))
        for method in ("m6b", "m6c", "m6d", "auto", "m6a"):
            rows.append(model_row(m12, "tiny_gemma L12", method,
                                  trace_out=curves if (curves is not None and dt is np.float64) else None))
        r = model_row(m12, "tiny_gemma L12", "m6a", info=True, order="open")
        r.note = "M7 built open loop: M6a's scale patch amplifies earlier layers' drift (MATH.md M7)"
        rows.append(r)
        rows.append(greedy_row(m12, "tiny_gemma L12"))
    return rows


def family_rows():
    """Every declared block family, float64 and float32, through the model (method 'auto')."""
    rows = []
    from ..blocks import FAMILY_SPECS

    for fam in sorted(set(FAMILY_SPECS) - {"gemma3"}):      # gemma3 has its own table above
        for dt in (np.float64, np.float32):
            m = models.tiny(fam, seed=0, dtype=dt)
            rows.append(model_row(m, f"tiny {fam}", "auto"))
    return rows


def format_table(rows):
    head = f"{'check':<30} {'model':<18} {'method':<12} {'dtype':<8} {'rel err':>9} {'no patch':>9} {'rank':>4} {'time s':>7}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = r.verdict
        ctrl = "-" if np.isnan(r.control) else f"{r.control:9.1e}"
        line = (f"{r.check:<30} {r.model:<18} {r.method:<12} {r.dtype:<8} {r.err:9.1e} {ctrl:>9} "
                f"{r.rank:>4} {r.seconds:7.3f}  {verdict} (bar {r.bar:.0e})")
        if r.note:
            line += f"  {r.note}"
        lines.append(line)
    return "\n".join(lines)


def summary(rows):
    """The closing line: passed, failed and info rows counted separately."""
    n = {v: sum(r.verdict == v for r in rows) for v in ("pass", "FAIL", "info")}
    return (f"{n['pass']} passed, {n['FAIL']} failed, {n['info']} info "
            f"(expected to fail: documented precondition, not counted)")


def plot_curves(curves, path):
    """Relative error of the residual stream after each layer, patched vs unpatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, errs in curves.items():
        style = "k--" if name == "unpatched" else "-o"
        ax.semilogy(range(len(errs)), np.maximum(errs, 1e-17), style, label=name, ms=3)
    ax.axhline(1e-10, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("layer (0 = embedding)")
    ax.set_ylabel("max rel. error of the residual stream")
    ax.set_title("M7 on a 12-layer random Gemma-style model (float64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
