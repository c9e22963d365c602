"""Plain helpers shared by the test modules (no pytest fixtures here: those are in conftest.py).

Test modules import from this file (``from helpers import rel_err``), never from each other.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from minipatch.blocks import attn_sublayer, block_forward, layer_patch
from minipatch.config import FAMILIES
from minipatch.controllability import take_rows
from minipatch.ops import silu, softmax

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Tolerances (MATH.md section 8): relative to max |reference|.
TOL64_BLOCK = 1e-12
TOL64_MODEL = 1e-10
TOL32 = 1e-4
CONTROL_MIN = 1e-3   # negative control: without patches the error must be at least this


def rel_err(a, b):
    """max |a - b| / max |b| on numpy copies (any backend)."""
    from minipatch.backend import to_numpy

    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def fixture(name):
    """Path of ``tests/fixtures/<name>`` (a folder or a file). The fixtures are part of the
    repository, so a missing one is an error, never a skip."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"fixture {path} is missing from the repository (see tests/fixtures/README.md)")
    return path


def load_npz(path):
    """{key: array} of an .npz of plain arrays (never unpickled)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def requirement_names():
    """Normalised names of every package requirements.txt installs (through pyproject's extras)."""
    try:
        import tomllib
    except ImportError:            # Python 3.10
        tomllib = None
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
    name_of = lambda req: norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        project = tomllib.loads(text)["project"]
        core, extras = project["dependencies"], project.get("optional-dependencies", {})
    else:
        block = lambda key: re.findall(r'"([^"]+)"', re.search(rf"^{key} = \[(.*?)\]", text, re.S | re.M).group(1))
        core = block("dependencies")
        extras = {k: block(k) for k in re.findall(r"^(\w+) = \[", text.split("[project.optional-dependencies]")[1]
                                                   .split("\n[")[0], re.M)}
    names = {"minipatch"}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.match(r"(?:-e\s+)?\.(?:\[([^\]]*)\])?$", line)
        if m:                       # the project itself, with extras
            names |= {name_of(r) for r in core}
            for extra in filter(None, (m.group(1) or "").split(",")):
                names |= {name_of(r) for r in extras.get(extra.strip(), [])}
        else:
            names.add(name_of(line))
    return names


def allowed_skip(reason, required=None):
    """True when ``reason`` names, after 'pip install', a package outside requirements.txt."""
    wanted = [re.sub(r"[-_.]+", "-", m).lower().strip("'\"")
              for m in re.findall(r"""pip install (?:--?\S+\s+)*["']?([A-Za-z0-9][A-Za-z0-9._-]*)""", reason)]
    required = requirement_names() if required is None else required
    return bool(wanted) and all(w not in required for w in wanted)


# ---- comparing printed text -----------------------------------------------------------------
# Committed notebook outputs and README numbers are compared with what the code prints today:
# the words must be the same, and every number must agree within one significant digit.

NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w])")
ROUNDING = 1e-11      # below this, a number is a rounding-level error: any two such values agree


def number_agrees(old, new):
    """Two printed numbers agree: integers exactly (counts, ids, sizes), other numbers within
    half a unit of the larger one's leading digit (1.5e-14 ~ 1.2e-14, 4.5e-6 !~ 1.4e-6), and
    any two values below ROUNDING."""
    x, y = float(old), float(new)
    if x == y:
        return True
    if re.fullmatch(r"[-+]?\d+", old) and re.fullmatch(r"[-+]?\d+", new):
        return False
    big = max(abs(x), abs(y))
    if big < ROUNDING:
        return True
    unit = 10.0 ** np.floor(np.log10(big))
    return abs(x - y) <= 0.5 * unit


def text_differences(old, new):
    """Where two printed texts disagree: [] when the words agree (whitespace runs collapsed) and
    every number agrees (:func:`number_agrees`); else a few (old, new) pairs."""
    nums_old, nums_new = NUMBER.findall(old), NUMBER.findall(new)
    words = lambda s: " ".join(NUMBER.sub("#", s).split())
    if words(old) != words(new) or len(nums_old) != len(nums_new):
        return [(words(old)[:400], words(new)[:400])]
    return [(a, b) for a, b in zip(nums_old, nums_new) if not number_agrees(a, b)][:10]


# ---- block families (tests/test_families.py, tests/test_failure_modes.py) -------------------

# family -> markers (pytest -m <family marker> / -m m8 grade one unit)
MARKS = {
    "gemma3": ("gemma", "m6", "m8"), "gemma2": ("gemma", "m6", "m8"), "llama": ("llama", "m8"),
    "gpt2": ("gpt2", "m8"), "olmo2": ("olmo2", "m6", "m8"), "postnorm": ("postnorm", "m8"),
    "gptj": ("parallel", "m8"), "neox": ("parallel", "m8"), "parallel": ("parallel", "m8"),
    "mixtral": ("moe", "m8"), "qwen2_moe": ("moe", "m8"),
    "vanilla_m3": ("vanilla", "m3"), "vanilla_m4": ("vanilla", "m4"),
}


def fam_params(families=FAMILIES):
    return [pytest.param(f, id=f, marks=[getattr(pytest.mark, m) for m in MARKS[f]]) for f in families]


def block_checks(model, tok, context, method="auto"):
    """Per layer: (patched error, unpatched error, construction, layer patch).

    Each block is checked on its own: its input is the with-context stream X_l^C at the kept
    positions, its target the with-context block output there (MATH.md M8 / M6 / M3 / M4).
    """
    cfg, spec = model.cfg, model.spec
    kept = np.setdiff1d(np.arange(len(tok)), context)
    trace = {}
    model.run(tok, trace=trace, head=False)
    xp = model.xp
    K = xp.asarray(kept)
    out = []
    for l, lp in enumerate(model.params["layers"]):
        full = trace["layers"][l]
        tr_ctx = {k: take_rows(full[k], K) for k in ("x", "a", "z", "h")}
        tr = {}
        attn_sublayer(spec, lp, tr_ctx["x"], cfg, l, K, trace=tr)
        name, patch = layer_patch(spec, lp, cfg, tr, tr_ctx, method)
        want = take_rows(full["out"], K)
        got = block_forward(spec, lp, tr_ctx["x"], cfg, l, K, patch)
        plain = block_forward(spec, lp, tr_ctx["x"], cfg, l, K)
        out.append((rel_err(got, want), rel_err(plain, want), name, patch))
    return out


def moe_loop_reference(p, n, cfg):
    """Plain loop: per token, softmax router, stable top-k (lower index wins ties), optional
    renormalisation, sum over the selected experts of w_e * down_e(silu(gate_e n) * up_e n),
    plus the sigmoid-gated shared expert."""
    out = np.zeros_like(n)
    for t in range(n.shape[0]):
        probs = softmax(p["router.weight"] @ n[t])
        top = sorted(range(cfg.n_experts), key=lambda e: -probs[e])[: cfg.top_k]
        w = {e: probs[e] for e in top}
        if cfg.moe_renormalize:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        for e in range(cfg.n_experts):     # all experts, unselected ones weighted 0
            h = silu(p["experts.gate_proj.weight"][e] @ n[t]) * (p["experts.up_proj.weight"][e] @ n[t])
            out[t] += w.get(e, 0.0) * (p["experts.down_proj.weight"][e] @ h)
        if "shared.gate_proj.weight" in p:
            hs = silu(p["shared.gate_proj.weight"] @ n[t]) * (p["shared.up_proj.weight"] @ n[t])
            g = 1 / (1 + np.exp(-(p["shared_gate.weight"] @ n[t])))
            out[t] += g * (p["shared.down_proj.weight"] @ hs)
    return out
