"""The README prints what the code prints.

Convention: a README block whose output carries numbers is re-run here and compared, every
number within one significant digit (``helpers.number_agrees``):

- the twelve-line example: each ``print(...)  # <number>: ...`` line against what it prints;
- the excerpt of the main job's table: each row against ``python -m minipatch --quick``, and
  the counts of its closing line;
- the three ``audit`` commands: their exit status and the errors the text quotes;
- the two commands of "Two commands" are those `.ci/run` runs (checked there).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex

import numpy as np
import pytest

from helpers import NUMBER, ROOT, number_agrees
from minipatch.__main__ import main

README = (ROOT / "README.md").read_text(encoding="utf-8")


def block_after(marker, lang):
    """The first ```lang code block after the line containing ``marker``."""
    start = README.index(marker)
    m = re.compile(rf"^```{lang}\n(.*?)^```$", re.S | re.M).search(README, start)
    assert m, f"no ```{lang} block after {marker!r}"
    return m.group(1)


def test_twelve_line_example_prints_what_it_says():
    code = block_after("## The idea in twelve lines", "python")
    claims = [float(NUMBER.search(line.split("#", 1)[1]).group()) for line in code.splitlines()
              if line.startswith("print(") and "#" in line]
    assert len(claims) == 2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = [float(line) for line in out.getvalue().split()]
    assert len(printed) == len(claims)
    for claim, got in zip(claims, printed):
        assert number_agrees(f"{claim:.1e}", f"{got:.1e}"), f"README says {claim}, the code prints {got}"
    assert printed[1] > 1e3 * printed[0]        # the claim that matters: patched exact, unpatched not


COLS = (slice(0, 30), slice(31, 49), slice(50, 62), slice(63, 71))   # check, model, method, dtype


def _rows(text):
    rows = {}
    for line in text.splitlines():
        m = re.search(r"(pass|FAIL|info)(?: \(bar|\s*$)", line)
        if not m or line.startswith("check"):
            continue
        key = tuple(line[c].strip() for c in COLS)
        nums = line[71:].split()
        rows[key] = (nums[0], nums[1], nums[2], m.group(1))     # rel err, no patch, rank, verdict
    return rows


@pytest.fixture(scope="module")
def main_quick(tmp_path_factory):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--quick", "--figures", str(tmp_path_factory.mktemp("fig"))])
    return rc, out.getvalue()


def test_main_job_table_excerpt(main_quick):
    rc, out = main_quick
    assert rc == 0
    quoted, fresh = _rows(block_after("An excerpt of its table", "text")), _rows(out)
    assert len(quoted) >= 10
    for key, (err, ctrl, rank, verdict) in quoted.items():
        assert key in fresh, f"README row {key} is not in the main job's table"
        f_err, f_ctrl, f_rank, f_verdict = fresh[key]
        assert (verdict, rank) == (f_verdict, f_rank), (key, verdict, f_verdict)
        assert number_agrees(err, f_err) and number_agrees(ctrl, f_ctrl), (key, err, f_err, ctrl, f_ctrl)


def test_main_job_closing_line(main_quick):
    _, out = main_quick
    last = out.rstrip().splitlines()[-1]
    quoted = re.search(r"`(\d+) passed, (\d+) failed, (\d+) info …`", README)
    assert quoted and last.startswith(f"{quoted[1]} passed, {quoted[2]} failed, {quoted[3]} info"), last


AUDIT = [shlex.split(line.strip()) for line in README.splitlines()     # the three on committed references
         if line.strip().startswith("python -m minipatch audit") and "--reference tests/fixtures" in line]


def _audit(capsys, argv):
    rc = main(argv[3:])
    out = capsys.readouterr().out
    return rc, out


def test_audit_examples_run_from_the_repository(capsys, monkeypatch):
    """The three README audit commands, from the repository root: what the text says."""
    monkeypatch.chdir(ROOT)
    assert len(AUDIT) == 3 and all("../" not in " ".join(a) for a in AUDIT)
    true_fp64, stock_json, stock_loose = AUDIT
    rc, out = _audit(capsys, true_fp64)
    assert rc == 0 and out.rstrip().endswith("OK")
    rc, out = _audit(capsys, stock_json)
    r = json.loads(out)
    assert rc == 1 and r["ok"] is False and r["first_divergent_layer"] == 1
    said = re.search(r"It is flagged: logits ([0-9.e+-]+) relative and first divergent\s+layer 1", README)
    assert said and number_agrees(said[1], f"{r['logits_max_rel_err']:.1e}"), (said, r["logits_max_rel_err"])
    rc, out = _audit(capsys, stock_loose)
    assert rc == 0


def test_audit_llama_stock_claim(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["audit", "tests/fixtures/llama", "--reference", "tests/fixtures/llama/reference_stock_fp64.npz", "--json"]
    rc = main(argv)
    r = json.loads(capsys.readouterr().out)
    said = re.search(r"Llama behaves the same \(([0-9.e+-]+), layer 1\)", README)
    assert rc == 1 and r["first_divergent_layer"] == 1
    assert said and number_agrees(said[1], f"{r['logits_max_rel_err']:.1e}")


# ---- the generation experiment (python -m minipatch experiment --json figures/experiment_generation.json) ----

EXPERIMENT = json.loads((ROOT / "figures" / "experiment_generation.json").read_text(encoding="utf-8"))["summary"]


def test_experiment_table_is_the_committed_results():
    """The README's table is format_table of the committed JSON, which the quoted command writes."""
    from minipatch.experiment_report import format_table

    assert "python -m minipatch experiment --json figures/experiment_generation.json" in README
    assert format_table(EXPERIMENT) in README


SINGLE = json.loads((ROOT / "figures" / "experiment_m6a_single.json").read_text(encoding="utf-8"))
SINGLE_RUN = next(r for r in SINGLE["runs"] if r["error"] and r["dtype"] == "float32")
SECONDS = json.loads((ROOT / "figures" / "experiment_generation.json").read_text(encoding="utf-8"))["seconds"]
BASELINE = (828, 9)          # the uncached per-run experiment the issue measured: seconds, configurations


@pytest.mark.parametrize("pattern,value", [
    # (a README phrase with one number, the number the committed results give)
    (r"keeps every\s+token in float64 \(error ([0-9.e+-]+)\)", lambda s: s["float64/closed/m6a"]["max_abs_err"]),
    (r"\(0 or ([0-9]+) of 100 tokens in every dtype\)",
     lambda s: max(s[f"{d}/open/m6a"]["agree"] for d in ("float32", "float64", "bfloat16"))),
    (r"`δ / u\^C` reaches ([0-9.e+-]+),", lambda s: s["float32/closed/m6a"]["largest_scale"]),
    (r"All runs together \(the table\): ([0-9]+)/100 tokens in float32", lambda s: s["float32/closed/m6a"]["agree"]),
    (r"and ([0-9]+)/100 in\s+bfloat16\. One at a time", lambda s: s["bfloat16/closed/m6a"]["agree"]),
    (r"\(`--engine single`, the `greedy` path\): ([0-9]+)/100 in float32",
     lambda s: SINGLE["summary"]["float32/closed/m6a"]["agree"]),
    (r"coordinate comes out as ([0-9.e+-]+), below", lambda s: float(re.search(r"= ([-0-9.e+]+) at", SINGLE_RUN["error"])[1])),
    (r"\(float32's machine epsilon, ([0-9.e+-]+)\), and", lambda s: float(np.finfo(np.float32).eps)),
    (r"\), and ([0-9]+)/100 in bfloat16:", lambda s: SINGLE["summary"]["bfloat16/closed/m6a"]["agree"]),
    (r"rounding level \(float64 ~([0-9.e+-]+),", lambda s: s["float64/closed/m6d"]["max_abs_err"]),
    (r"float32 ~([0-9.e+-]+)\)\. In open loop", lambda s: s["float32/closed/m6d"]["max_abs_err"]),
    (r"M6c's residual scale patch \(up to ([0-9.e+-]+)\)", lambda s: s["float64/open/m6c"]["largest_scale"]),
    (r"amplifies rounding\s+\(float64 ([0-9.e+-]+),", lambda s: s["float64/open/m6c"]["max_abs_err"]),
    (r"while M6d's stays near ([0-9.e+-]+),", lambda s: s["float64/open/m6d"]["largest_scale"]),
    (r"The full run takes ([0-9]+) s on 2", lambda s: round(SECONDS)),
    (r"speed-up \(([0-9]+)x in wall time", lambda s: round(BASELINE[0] / SECONDS)),
    (r"in wall time, ([0-9]+)x per configuration;", lambda s: round(BASELINE[0] / BASELINE[1] / (SECONDS / 24))),
])
def test_experiment_prose_quotes_the_results(pattern, value):
    said = re.search(pattern, README)
    assert said, pattern
    got = value(EXPERIMENT)
    assert number_agrees(said[1], f"{got:.1e}" if isinstance(got, float) else str(got)), (said[1], got)


def test_single_engine_command_is_quoted():
    assert ("python -m minipatch experiment --engine single --dtypes float32,bfloat16 --methods m6a "
            "--orders closed --json figures/experiment_m6a_single.json") in README
    assert SINGLE["engine"] == "single" and len(SINGLE["runs"]) == 10
    assert "u^C coordinate" in SINGLE_RUN["error"] and "layer 15" in SINGLE_RUN["error"]


@pytest.mark.parametrize("pattern,key", [
    (r"float64 ([0-9.e+-]+) \(M6a ([0-9.e+-]+)\)", ("M7 through 12 layers", "m6d", "float64", "m6a")),
    (r"float32 ([0-9.e+-]+) \(M6a ([0-9.e+-]+)\)\. Built", ("M7 through 12 layers", "m6d", "float32", "m6a")),
])
def test_m6_paragraph_quotes_the_main_job(main_quick, pattern, key):
    """The "Gemma constructions" paragraph quotes the main job's closed-loop rows."""
    said = re.search(pattern, README)
    assert said, pattern
    fresh = _rows(main_quick[1])
    check, method, dtype, other = key
    got = {k[2]: v[0] for k, v in fresh.items() if k[0] == check and k[3] == dtype}   # method -> rel err
    assert number_agrees(said[1], got[method]) and number_agrees(said[2], got[other]), (said.groups(), got)


def test_m6_paragraph_open_loop_numbers(main_quick):
    said = re.search(r"the layers below: ([0-9.e+-]+) in float64 and ([0-9.e+-]+), i\.e\.", README)
    fresh = _rows(main_quick[1])
    got = {k[3]: v[0] for k, v in fresh.items() if k[0] == "M7 through 12 layers" and k[2] == "m6a/open"}
    assert said and number_agrees(said[1], got["float64"]) and number_agrees(said[2], got["float32"]), got


def test_performance_numbers_are_the_committed_benchmarks():
    """The Performance table and text quote figures/bench_cache.json and bench_real_gemma.json,
    which the quoted benchmark commands write."""
    c = json.loads((ROOT / "figures" / "bench_cache.json").read_text(encoding="utf-8"))
    r = json.loads((ROOT / "figures" / "bench_real_gemma.json").read_text(encoding="utf-8"))
    e = json.loads((ROOT / "figures" / "bench_experiment.json").read_text(encoding="utf-8"))
    text = " ".join(README[README.index("### Performance"):README.index("## Auditing")].split())
    sc = {row["T"]: row for row in c["scaling"]}
    for want in (f"per token | {c['greedy_per_token_s']['ratio']:.2f} |",
                 f"| {c['absorb_vs_forward']['ratio']:.2f}; {c['absorb_vs_forward']['ratio_open']:.2f} |",
                 f"non-finite checks | {c['finite_checks']['ratio']:.2f} |",
                 f"| {r['ours_vs_hf']:.2f} | ≤ 1.0 |", f"| {r['absorb_s'] / r['hf']['forward_s']:.2f} |",
                 f"time grows {sc[8192]['forward_s'] / sc[128]['forward_s']:.0f}x for the forward and "
                 f"{sc[8192]['absorb_s'] / sc[128]['absorb_s']:.0f}x for absorb",
                 f"about {sc[8192]['absorb_peak_mb'] / 8192 * 1024:.0f} KB per token",
                 f"{e['prompts']} prompts × {e['n_new']} tokens × {e['configurations']} configurations), one run at "
                 f"a time / all runs together | {e['ratio']:.1f} |"):
        assert want in text, want
    said = re.search(r"one experiment step at T = (\d+) costs ([0-9.]+)x less", " ".join(README.split()))
    assert said and int(said[1]) == c["experiment_step_s"]["length"]
    assert number_agrees(said[2], f"{c['experiment_step_s']['ratio']:.1f}")


def test_gpu_numbers_are_the_committed_benchmark():
    """The Backends section quotes figures/bench_gpu.json (benchmarks/bench_gpu.py on an H200)."""
    g = json.loads((ROOT / "figures" / "bench_gpu.json").read_text(encoding="utf-8"))
    s = {r["T"]: r for r in g["sizes"]}
    text = " ".join(README[README.index("## Backends"):README.index("## Layout")].split())
    gr = g["greedy_per_token_s"]
    for want in ("python benchmarks/bench_gpu.py --json figures/bench_gpu.json", g["device"],
                 f"4096 tokens takes {s[4096]['absorb_s']:.2f} s, against {s[4096]['forward_s']:.2f} s",
                 f"to {s[4096]['rel_err']:.1e} (control {s[4096]['control']:.1f})",
                 f"costs {gr['ratio']:.1f}x a plain one ({gr['absorbed'] * 1e3:.0f} ms against "
                 f"{gr['plain'] * 1e3:.0f} ms)"):
        assert want in text, want
    assert all(r["rel_err"] <= 1e-4 < r["control"] for r in g["sizes"]) and s[4096]["absorb_s"] < 1.0
