"""Packed runs (minipatch.packed): a shared prefix and many suffixes in one pass equal the
separate runs, row for row (the vectorized path against the plain loop of Model.forward)."""
from __future__ import annotations

import numpy as np
import pytest

from minipatch import packed
from minipatch.errors import InputError
from minipatch.models import tiny, tiny_gemma

from helpers import CONTROL_MIN, TOL64_MODEL, rel_err

rng = np.random.default_rng


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_packed_rows_equal_separate_runs(family):
    """Every row of a packed run equals its token's row in the run of prefix ++ suffix alone
    (float64), sliding windows (4 positions in tiny_gemma) included."""
    m = tiny_gemma(seed=3, n_layers=3) if family == "gemma3" else tiny("llama", seed=3, n_layers=3)
    pre = rng(0).integers(0, 256, 7)
    sufs = [rng(1 + i).integers(0, 256, n) for i, n in enumerate((3, 6, 1, 4))]
    pk = packed.pack(pre, sufs, 256)
    got = packed.logits(m, packed.run(m, pk), np.arange(pk.tokens.size))
    for b, s in enumerate(sufs):
        ref = m.forward(np.r_[pre, s])
        assert rel_err(got[pk.rows(b)], ref[7:]) < TOL64_MODEL
        assert rel_err(got[:7], ref[:7]) < TOL64_MODEL
    # negative control: attending across suffixes (one long sequence) changes the later suffixes
    joined = m.forward(pk.tokens)
    assert rel_err(joined[pk.rows(3)], got[pk.rows(3)]) > CONTROL_MIN


def test_mask_by_hand():
    pk = packed.pack([5, 6], [[1, 2], [3]], 256)
    assert pk.positions.tolist() == [0, 1, 2, 3, 2] and pk.seq.tolist() == [-1, -1, 0, 0, 1]
    assert pk.starts.tolist() == [2, 4, 5] and pk.last_rows().tolist() == [3, 4]
    want = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 0, 0, 1]], bool)
    assert np.array_equal(packed.visible(pk), want)
    w2 = packed.visible(pk, window=2)            # q - k < 2 on positions
    assert not w2[3, 1] and w2[3, 2] and not w2[4, 0] and w2[4, 1]


def test_start_steer_and_trace():
    """Running from layer l on the traced stream equals the full run; a steer vector is added to
    that layer's output; the model is untouched."""
    m = tiny_gemma(seed=1, n_layers=3)
    pk = packed.pack(rng(2).integers(0, 256, 4), [rng(3).integers(0, 256, 3), rng(4).integers(0, 256, 2)], 256)
    tr = {}
    full = packed.run(m, pk, trace=tr)
    assert rel_err(packed.run(m, pk, start=2, x=tr["layers"][2]["x"]), full) < TOL64_MODEL
    d = rng(5).standard_normal(m.cfg.d_model)
    steered = packed.run(m, pk, start=2, x=tr["layers"][2]["x"], steer=[None, None, d])
    assert rel_err(steered, full + d) < TOL64_MODEL
    assert rel_err(packed.run(m, pk, steer=[d, None, None]), full) > CONTROL_MIN
    with pytest.raises(InputError):
        packed.run(m, pk, start=1)
    with pytest.raises(InputError):
        packed.run(m, pk, start=4, x=full)
    with pytest.raises(InputError):
        packed.pack([1], [[]], 256)
