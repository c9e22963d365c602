"""Prompts into weights, measured: in-context tasks condensed into token-independent edits.

For each task and seed (:mod:`minipatch.icl_tasks` protocol):

1. **Baselines** on the held-out queries: zero-shot, and in context with k = 5 and k = 10
   demonstrations. A task is *learned in context* when k = 10 beats zero-shot by at least
   ``min_gain`` (first-token accuracy, mean over seeds); only those are condensed.
2. **Calibration** (:func:`~minipatch.condense_data.collect`): the patches of the 10-shot prompt
   over the calibration queries, all layers (M7) and one layer at a time (MATH.md T5).
3. **Edits** from the first n calibration queries, n in ``sizes``: every layer edited
   (T1 vector, T2 least squares, T3 covariance ridge, T4 rank r of T3), or one layer (T1, T3)
   chosen by the KL to the 10-shot model on the first ``n_select`` calibration queries.
4. **Evaluation** on the held-out queries *without* demonstrations: first-token accuracy, exact
   match, and KL(10-shot || edited) at the first answer token, next to zero-shot (floor) and
   10-shot (ceiling).

Nothing is chosen on held-out queries (the ridge by GCV on calibration tokens, the layer on
calibration queries). :func:`run_study` returns a JSON-able dict; per (task, seed) results are
cached on disk by a digest of the model and the configuration.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import icl_tasks as it
from .backend import to_numpy
from .condense_data import collect, layer_edit
from .packed import run
from .thought import RankDeficientWarning, condensed_model

VERSION = 2        # of the study's procedure: part of the cache key, raised when results would change
ALL_VARIANTS = ("vector", "lstsq", "ridge", "ridge-r1", "ridge-r4", "ridge-r16")
ONE_VARIANTS = ("vector", "ridge")


@dataclass(frozen=True)
class StudyConfig:
    """Counts of the study (defaults: the full study of the README)."""

    tasks: tuple = it.TASKS
    seeds: tuple = (0, 1, 2)
    n_demos: int = 10
    k_small: int = 5
    n_calib: int = 64
    n_held: int = 40
    sizes: tuple = (1, 4, 16, 64)
    n_select: int = 6
    ranks: tuple = (1, 4, 16)
    min_gain: float = 0.2
    method: str = "auto"


CHUNK = 128                                   # head rows per matmul: [128, V] logits at a time


def log_softmax(z):
    """Row-wise log-softmax (in the logits' dtype)."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def first_index(bt):
    """Index into ``bt.answer_rows`` of each query's first answer row."""
    return np.searchsorted(bt.owner, np.arange(bt.first_rows.size))


def hidden(model, bt, rows=None, *, deltas=None, steer=None, start=0, x=None):
    """The final-normed hidden [len(rows), D] at ``rows`` (default: the answer rows) of ``model``
    plus dense ``deltas`` per layer, or a residual ``steer`` per layer, on batch ``bt``."""
    m = condensed_model(model, deltas) if deltas is not None else model
    xf = run(m, bt.pack, start=start, x=x, steer=steer)
    return norm_rows(model, xf, bt.answer_rows if rows is None else rows)


def head(model, hs):
    """Logits (numpy) of several hidden blocks [A_i, D], blocks grouped into matmuls of about
    CHUNK rows: the head ([V, D], 671 MB for Gemma 3 270M in float32) is read once per group."""
    out, group = [], []

    def flush():
        if group:
            lg = np.asarray(to_numpy(model.logits(model.xp.concat(group, axis=0))))
            cuts = np.cumsum([0] + [g.shape[0] for g in group])
            out.extend(lg[i:j] for i, j in zip(cuts[:-1], cuts[1:]))
            group.clear()

    for h in hs:
        if group and sum(g.shape[0] for g in group) + h.shape[0] > CHUNK:
            flush()
        group.append(h)
    flush()
    return out


def kl(ref, lp):
    """KL(ref || lp) per row, from log-probabilities [B, V]."""
    return np.sum(np.exp(ref) * (ref - lp), axis=-1, dtype=np.float64)


def scores(lg, bt, ref):
    """Per-query first, exact and (``ref`` not None) KL at the first answer row, from the logits
    [A, V] at the answer rows."""
    first, exact = it.score(lg, bt)
    out = {"first": first.tolist(), "exact": exact.tolist()}
    if ref is not None:
        out["kl"] = kl(ref, log_softmax(lg[first_index(bt)])).tolist()
    return out


def baselines(model, bos, encode, sp, cfg):
    """Zero-shot and in-context scores on the held-out queries; also returns the 10-shot
    log-probabilities at the first answer rows, the zero-shot batch and its layer input streams."""
    V = model.cfg.vocab_size
    held0 = it.batch(bos, [], sp.held, encode, V)
    bts = [it.batch(bos, it.demo_tokens(sp.demos[:k], encode), sp.held, encode, V)
           for k in (cfg.n_demos, cfg.k_small)]
    tr = {}
    hs = [hidden(model, bt) for bt in bts] + [norm_rows(model, run(model, held0.pack, trace=tr), held0.answer_rows)]
    lgs = head(model, hs)
    ref = log_softmax(lgs[0][first_index(bts[0])])
    out = {}
    for name, bt, lg in zip((f"icl{cfg.n_demos}", f"icl{cfg.k_small}", "zero"), bts + [held0], lgs):
        out[name] = scores(lg, bt, ref)
    return out, ref, held0, tuple(t["x"] for t in tr["layers"])


def norm_rows(model, xf, rows):
    from .patches import norm

    return norm(model.params, "final_norm", xf[np.asarray(rows)], model.cfg)


def condense_seed(model, bos, encode, sp, cfg, ref, held0, held_streams):
    """Calibrate on ``sp.calib`` and evaluate every edit on the held-out queries (module docstring)."""
    V, L = model.cfg.vocab_size, model.cfg.n_layers
    ctx = it.batch(bos, it.demo_tokens(sp.demos, encode), sp.calib, encode, V)
    noctx = it.batch(bos, [], sp.calib, encode, V)
    kept = it.kept_rows(ctx, noctx)
    cal_all, cal_one, final_ctx = collect(model, ctx, noctx, kept, cfg.method)
    fc = np.asarray(to_numpy(final_ctx))
    patched = np.asarray(to_numpy(run(model, noctx.pack, patches=cal_all.patches)))
    res = {"m7_rel_err": float(np.max(np.abs(patched - fc[kept])) / np.max(np.abs(fc))),
           "m7_unpatched_rel_err": float(np.max(np.abs(np.asarray(to_numpy(run(model, noctx.pack))) - fc[kept]))
                                         / np.max(np.abs(fc))),
           "sizes": {}}
    cref = log_softmax(head(model, [norm_rows(model, final_ctx, ctx.first_rows)])[0])
    for n in cfg.sizes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RankDeficientWarning)   # reported instead: all_exact, max_rel_residual
            per, report = {v: [] for v in ALL_VARIANTS}, {"lstsq": [], "ridge": []}
            for l in range(L):
                for form in ("vector", "lstsq", "ridge"):
                    for v, e in layer_edit(model, cal_all, l, n, form, cfg.ranks).items():
                        per[v].append(e)
                        if v in report:
                            report[v].append(e.report)
            hs = [hidden(model, held0, **_assemble(model, per[v], v)) for v in ALL_VARIANTS]
            row = {f"{v}/all": scores(lg, held0, ref) for v, lg in zip(ALL_VARIANTS, head(model, hs))}
            fits = {f: [r for lr in report[f] for r in lr.values() if "tokens" in r] for f in report}
            row["lstsq/all"].update(
                max_rel_residual=max(r["rel_residual"] for r in fits["lstsq"]),
                all_exact=all(r["exact"] for r in fits["lstsq"]), tokens=fits["lstsq"][0]["tokens"],
                rel_norm=float(np.mean([r["rel_norm"] for r in fits["lstsq"]])))
            row["ridge/all"].update(kappas=[r["kappa"] for r in fits["ridge"]],
                                    rel_norm=float(np.mean([r["rel_norm"] for r in fits["ridge"]])))
            row.update(_one_layer(model, cal_one, noctx, cref, n, cfg, ref, held0, held_streams))
        res["sizes"][str(n)] = row
    return res


def _assemble(model, edits, variant):
    if variant == "vector":
        return {"steer": [e.steer for e in edits]}
    return {"deltas": [e.deltas for e in edits] + [{} for _ in range(model.cfg.n_layers - len(edits))]}


def _only(model, layer, e, variant):
    """The run arguments of one edited layer."""
    L = model.cfg.n_layers
    if variant == "vector":
        return {"steer": [None] * layer + [e.steer] + [None] * (L - layer - 1)}
    return {"deltas": [{}] * layer + [e.deltas] + [{}] * (L - layer - 1)}


def _one_layer(model, cal, noctx, cref, n, cfg, ref, held0, held_streams):
    """The best single layer per variant, chosen by the KL to the 10-shot model on the first
    ``n_select`` calibration queries (their first answer rows)."""
    L, m = model.cfg.n_layers, min(n, cfg.n_select)
    sel = noctx.head(m)
    rows = int(sel.pack.tokens.size)
    edits, hs = {v: [] for v in ONE_VARIANTS}, {v: [] for v in ONE_VARIANTS}
    for l in range(L):
        cand = {**layer_edit(model, cal, l, n, "vector"), **layer_edit(model, cal, l, n, "ridge")}
        for v in ONE_VARIANTS:
            kw = _only(model, l, cand[v], v)
            hs[v].append(hidden(model, sel, sel.first_rows, start=l, x=cal.streams[l][:rows], **kw))
            edits[v].append(kw)
    lgs = head(model, [h for v in ONE_VARIANTS for h in hs[v]])
    out, best = {}, {}
    for i, v in enumerate(ONE_VARIANTS):
        kls = [float(np.mean(kl(cref[:m], log_softmax(lg)))) for lg in lgs[i * L:(i + 1) * L]]
        best[v] = (int(np.argmin(kls)), kls)
    hs_held = [hidden(model, held0, start=best[v][0], x=held_streams[best[v][0]], **edits[v][best[v][0]])
               for v in ONE_VARIANTS]
    for v, lg in zip(ONE_VARIANTS, head(model, hs_held)):
        out[f"{v}/one"] = {**scores(lg, held0, ref), "layer": best[v][0], "calib_kl": best[v][1]}
    return out


def _digest(model, cfg, task, seed):
    from .binding import fingerprint

    key = json.dumps([fingerprint(model), asdict(cfg), task, seed, VERSION], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


_WORK = {}          # model, bos, encode, cfg and the examples of every task, for _unit


def _unit(job):
    """One (stage, task, seed) of the study; the baselines' arrays are kept for the condensation."""
    stage, task, seed = job
    model, bos, encode, cfg = (_WORK[k] for k in ("model", "bos", "encode", "cfg"))
    sp = it.split(_WORK["examples"][task], seed, cfg.n_demos, cfg.n_calib, cfg.n_held)
    t0 = time.perf_counter()
    kept = _WORK["kept"].pop((task, seed), None)
    if kept is None:
        b, *kept = baselines(model, bos, encode, sp, cfg)
    if stage == "baselines":
        _WORK["kept"][(task, seed)] = kept
        return job, {"baselines": b, "seconds": time.perf_counter() - t0}
    return job, {"condense": condense_seed(model, bos, encode, sp, cfg, *kept), "seconds": time.perf_counter() - t0}


def _map(jobs, bar):
    for j in jobs:
        yield _unit(j)
        bar.update(1)


def run_study(model, bos, encode, cfg=StudyConfig(), cache=None, progress=True):
    """The study (module docstring); returns a JSON-able dict.

    Args:
      model: the model (float32 Gemma 3 270M for the README). bos: its BOS id. encode: text ->
        token ids without BOS. cfg: :class:`StudyConfig`.
      cache: folder for per (task, seed) results, reused when the model and the configuration
        are the same (None: no cache).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    _WORK.update(model=model, bos=bos, encode=encode, cfg=cfg, kept={},
                 examples={t: it.encode_examples(it.load_task(t), encode) for t in cfg.tasks})
    res = {}
    paths = {(t, s): (Path(cache) / f"{t}-{s}-{_digest(model, cfg, t, s)}.json" if cache else None)
             for t in cfg.tasks for s in cfg.seeds}
    for key, path in paths.items():
        if path is not None and path.is_file():
            res[key] = json.loads(path.read_text())

    def save(key):
        if paths[key] is not None:
            paths[key].parent.mkdir(parents=True, exist_ok=True)
            paths[key].write_text(json.dumps(res[key]))

    todo = [("baselines",) + k for k in paths if k not in res]
    with tqdm(total=len(todo), desc="icl-tasks: baselines", disable=not progress) as bar:
        for (_, t, s), r in _map(todo, bar):
            res[(t, s)] = r
            save((t, s))
    learned, gains = {}, {}
    for t in cfg.tasks:
        g = [np.mean(res[(t, s)]["baselines"][f"icl{cfg.n_demos}"]["first"])
             - np.mean(res[(t, s)]["baselines"]["zero"]["first"]) for s in cfg.seeds]
        gains[t], learned[t] = float(np.mean(g)), bool(np.mean(g) >= cfg.min_gain)
    for key in [k for k in _WORK["kept"] if not learned[k[0]]]:
        del _WORK["kept"][key]                          # free what no condensation needs
    todo = [("condense", t, s) for t in cfg.tasks if learned[t] for s in cfg.seeds if "condense" not in res[(t, s)]]
    with tqdm(total=len(todo), desc="icl-tasks: condensation", disable=not progress) as bar:
        for (_, t, s), r in _map(todo, bar):
            res[(t, s)].update(condense=r["condense"], condense_seconds=r["seconds"])
            save((t, s))
    out = {"config": asdict(cfg), "tasks": {}, "seconds": time.perf_counter() - t0}
    for t in cfg.tasks:
        out["tasks"][t] = {"n_examples": len(_WORK["examples"][t]), "learned": learned[t], "gain": gains[t],
                           "seeds": {str(s): res[(t, s)] for s in cfg.seeds}}
    _WORK.clear()
    return out


__all__ = ["ALL_VARIANTS", "ONE_VARIANTS", "StudyConfig", "hidden", "head", "scores", "baselines", "condense_seed",
           "run_study"]
