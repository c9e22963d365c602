"""Prompts into weights: the task protocol, the calibration data (packed M7, T5) and the exactness
the theory promises (MATH.md T1, T2), and the study pipeline on a tiny random model.

The accuracy numbers of the study need the real model and half an hour
(``python -m minipatch icl-tasks``); here the pipeline runs with small counts and the checks are
the exactness claims and the structure of the results."""
from __future__ import annotations

import json

import numpy as np
import pytest

from minipatch import icl_report, packed
from minipatch import icl_tasks as it
from minipatch.condense_data import collect, layer_edit
from minipatch.condense_study import StudyConfig, run_study
from minipatch.errors import InputError
from minipatch.models import tiny_gemma
from minipatch.thought import RankDeficientWarning, condensed_model

from helpers import CONTROL_MIN, TOL64_MODEL, rel_err

pytestmark = pytest.mark.thought
COUNTS = {"antonym": 2398, "capitalize": 813, "country-capital": 197, "english-french": 4698,
          "landmark-country": 836, "person-sport": 318, "present-past": 293, "singular-plural": 205,
          "synonym": 2880}     # minipatch/data/function_vectors/README.md


def test_task_data_is_shipped_with_its_licence():
    from importlib import resources

    folder = resources.files("minipatch").joinpath("data", "function_vectors")
    assert "MIT License" in folder.joinpath("LICENSE").read_text() and "Todd" in folder.joinpath("README.md").read_text()
    for name in it.TASKS:
        pairs = it.load_task(name)
        assert len(pairs) == COUNTS[name] and all(isinstance(x, str) and isinstance(y, str) for x, y in pairs)
    with pytest.raises(InputError):
        it.load_task("../README")


def test_split_and_prompt_format():
    enc = it.byte_encoder(256)
    ex = it.encode_examples([("a", "b"), ("a", "c"), ("", "x"), ("dd", "e")] + [(f"w{i}", f"v{i}") for i in range(20)], enc)
    assert [e.x for e in ex[:2]] == ["a", "dd"] and len(ex) == 22            # duplicate and empty inputs dropped
    sp = it.split(ex, 0, 3, 5, 4)
    assert (len(sp.demos), len(sp.calib), len(sp.held)) == (3, 5, 4)
    assert len({e.x for e in sp.demos + sp.calib + sp.held}) == 12          # disjoint
    assert it.split(ex, 0, 3, 5, 4) == sp and it.split(ex, 1, 3, 5, 4) != sp
    with pytest.raises(InputError):
        it.split(ex, 0, 10, 10, 10)
    text = bytes(it.demo_tokens(sp.demos[:1], enc).astype(np.uint8)).decode()
    assert text == f"Q: {sp.demos[0].x}\nA: {sp.demos[0].y}\n\n"
    bt = it.batch(1, it.demo_tokens(sp.demos, enc), sp.held, enc, 256)
    toks = bt.pack.tokens
    for b, e in enumerate(sp.held):                 # teacher forcing: each answer row reads the token before
        rows = bt.answer_rows[bt.owner == b]
        assert bytes(toks[bt.pack.rows(b)].astype(np.uint8)).decode() == f" {e.x}\nA: {e.y}"[:-1]
        assert np.array_equal(toks[rows[1:]], e.answer[:-1]) and np.array_equal(bt.targets[bt.owner == b], e.answer)
    zero = it.batch(1, [], sp.held, enc, 256)
    kept = it.kept_rows(bt, zero)
    assert np.array_equal(toks[kept], zero.pack.tokens)
    with pytest.raises(InputError):
        it.kept_rows(bt, it.batch(1, [], sp.calib[:4], enc, 256))


def test_score_by_hand():
    enc = it.byte_encoder(256)
    ex = it.encode_examples([("x", "ab"), ("y", "c")], enc)
    bt = it.batch(1, [], ex, enc, 256)
    lg = np.zeros((bt.targets.size, 256))
    lg[np.arange(bt.targets.size), bt.targets] = 1.0       # all right
    lg[1, 0] = 5.0                                          # second token of the first answer wrong
    first, exact = it.score(lg, bt)
    assert first.tolist() == [True, True] and exact.tolist() == [False, True]


@pytest.fixture(scope="module")
def calibration():
    # full attention: tiny_gemma's 4-token window would make tokens ending alike ("Albania",
    # "Algeria") identical calibration inputs in a sliding layer
    m = tiny_gemma(seed=0, n_layers=3, layer_types=("full",) * 3)
    enc = it.byte_encoder(256)
    sp = it.split(it.encode_examples(it.load_task("country-capital"), enc), 0, 3, 4, 4)
    ctx = it.batch(1, it.demo_tokens(sp.demos, enc), sp.calib, enc, 256)
    noctx = it.batch(1, [], sp.calib, enc, 256)
    kept = it.kept_rows(ctx, noctx)
    cal_all, cal_one, final = collect(m, ctx, noctx, kept)
    return m, ctx, noctx, kept, cal_all, cal_one, final


@pytest.mark.m7
def test_packed_m7_is_exact(calibration):
    """T5, all layers: the packed closed-loop patches reproduce the with-context stream at every
    kept row without the demonstrations (contiguous positions), float64."""
    m, ctx, noctx, kept, cal_all, cal_one, final = calibration
    got = packed.run(m, noctx.pack, patches=cal_all.patches)
    assert rel_err(got, final[kept]) < TOL64_MODEL
    assert rel_err(packed.run(m, noctx.pack), final[kept]) > CONTROL_MIN
    tr = {}
    packed.run(m, ctx.pack, trace=tr)
    for l in range(m.cfg.n_layers):                 # T5, one layer: that layer's output becomes the with-context one
        lt = {}
        packed.run(m, noctx.pack, start=l, x=cal_one.streams[l],
                   patches=[cal_one.patches[l] if i == l else None for i in range(m.cfg.n_layers)], trace=lt)
        assert rel_err(lt["layers"][0]["out"], tr["layers"][l]["out"][kept]) < TOL64_MODEL
        assert rel_err(cal_one.streams[l], tr["layers"][l]["x"][kept]) > CONTROL_MIN or l == 0


def test_t2_reproduces_every_calibration_patch(calibration):
    """T2 with at most `in` independent calibration inputs: dW* a_t = u_t for every token and weight
    (relative 1e-10, float64); with more tokens than inputs it is a fit with a reported residual.
    A token two queries share (the same prefix) is one calibration token."""
    m, _, noctx, _, cal_all, _, _ = calibration
    idx = cal_all.rows(2)
    assert idx.size < int(cal_all.ends[2]) <= m.cfg.d_model                 # " " after "Q:" is shared
    for l in range(m.cfg.n_layers):
        e = layer_edit(m, cal_all, l, 2, "lstsq")["lstsq"]
        for name, p in cal_all.patches[l].items():
            if name.endswith("proj.weight"):
                a = p.v[idx] / np.sum(p.v[idx] ** 2, axis=1, keepdims=True)
                assert rel_err(a @ e.deltas[name].T, p.u[idx]) < 1e-10, (l, name)
                assert e.report[name]["rel_residual"] < 1e-10 and e.report[name]["exact"]
                dup = np.setdiff1d(np.arange(int(cal_all.ends[2])), idx)    # the repeated rows are reproduced too
                a2 = p.v[dup] / np.sum(p.v[dup] ** 2, axis=1, keepdims=True)
                assert rel_err(a2 @ e.deltas[name].T, p.u[dup]) < 1e-10
        v = layer_edit(m, cal_all, l, 2, "vector")["vector"]         # T1: the mean shift
        assert rel_err(v.steer, cal_all.shift[l][idx].mean(0)) < 1e-12
    over = layer_edit(m, cal_all, 1, 4, "lstsq")["lstsq"]             # 4 queries: more tokens than D
    assert cal_all.rows(4).size > m.cfg.d_model and over.report["gate_proj.weight"]["rel_residual"] > CONTROL_MIN
    with pytest.warns(RankDeficientWarning):                          # the duplicates, kept, make A deficient
        from minipatch.thought import lstsq_patch

        p = cal_all.patches[1]["down_proj.weight"]
        lstsq_patch(p.v[:int(cal_all.ends[2])], p.u[:int(cal_all.ends[2])])


def test_unique_rows_by_hand():
    from minipatch.condense_data import unique_rows

    pk = packed.pack([1, 2], [[5, 6, 7], [5, 6, 8], [9], [5]], 256)
    assert unique_rows(pk).tolist() == [True, True, True, True, True, False, False, True, True, False]


def test_edits_do_not_touch_the_model(calibration):
    m, _, _, _, cal_all, _, _ = calibration
    before = {k: v.copy() for k, v in m.params["layers"][1].items()}
    e = layer_edit(m, cal_all, 1, 2, "ridge", ranks=(1, 2))
    assert set(e) == {"ridge", "ridge-r1", "ridge-r2"}
    assert np.linalg.matrix_rank(e["ridge-r1"].deltas["down_proj.weight"]) == 1
    cm = condensed_model(m, [{}, e["ridge"].deltas, {}])
    assert all(np.array_equal(m.params["layers"][1][k], v) for k, v in before.items())
    assert not np.array_equal(cm.params["layers"][1]["down_proj.weight"], before["down_proj.weight"])
    with pytest.raises(InputError):
        layer_edit(m, cal_all, 1, 2, "mean")


QUICK = StudyConfig(tasks=("country-capital",), seeds=(0, 1), n_demos=3, k_small=2, n_calib=4, n_held=4,
                    sizes=(1, 4), n_select=2, ranks=(1, 4), min_gain=-1.0)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    cache = tmp_path_factory.mktemp("icl-cache")
    m = tiny_gemma(seed=0, n_layers=3)
    return m, cache, run_study(m, 1, it.byte_encoder(256), QUICK, cache=cache, progress=False)


def test_study_pipeline_on_a_tiny_model(tiny_study):
    """The reduced study: every baseline and method scored for every seed and size, the M7
    exactness recorded, the results JSON-able, and the cache reused."""
    m, cache, res = tiny_study
    t = res["tasks"]["country-capital"]
    assert t["learned"] and set(t["seeds"]) == {"0", "1"}
    for s in t["seeds"].values():
        assert set(s["baselines"]) == {"zero", "icl2", "icl3"} and len(s["baselines"]["zero"]["first"]) == 4
        c = s["condense"]
        assert c["m7_rel_err"] < TOL64_MODEL and c["m7_unpatched_rel_err"] > CONTROL_MIN
        assert set(c["sizes"]) == {"1", "4"}
        for row in c["sizes"].values():
            assert set(row) == set(icl_report.METHODS)
            for cell in row.values():
                assert len(cell["kl"]) == 4 and min(cell["kl"]) > -1e-9
            assert 0 <= row["vector/one"]["layer"] < 3
        assert c["sizes"]["1"]["lstsq/all"]["max_rel_residual"] < 1e-10
    again = run_study(m, 1, it.byte_encoder(256), QUICK, cache=cache, progress=False)
    assert json.dumps(again["tasks"]) == json.dumps(json.loads(json.dumps(res["tasks"])))


def test_report_tables_and_figure(tiny_study, tmp_path):
    _, _, res = tiny_study
    s = icl_report.summary(res)["country-capital"]
    assert s["icl3"]["first"]["n"] == 2 and set(s["methods"]) == set(icl_report.METHODS)
    text = icl_report.tables(res)
    assert text.count("\n| T") == 2 * len(icl_report.METHODS) and "(n=" in text
    icl_report.figure(res, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000
