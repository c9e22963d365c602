"""The audit reference file (``REF.npz``, FORMATS.md): read and validated without unpickling.

Members (plain arrays; Hugging Face's batch of one, ``[1, T]``, is read as ``[T]``):

- ``input_ids`` [T] (integer) and ``logits`` [T, V] (real floating, finite, not all zero);
- optionally ``hidden_states`` [L+1, T, D] (HF layout: [0] embeddings, [i] after decoder
  layer i, [L] after the final norm), ``context_positions`` [C] (distinct, in [0, T)),
  ``sublayers.<name>`` [L, T, W] for the names of :data:`~minipatch.audit.sublayers.SUBLAYERS`,
  and the text members ``reference_kind`` ('true-float64', 'stock-float64', 'stock-float32')
  and ``islands`` (what ``python -m minipatch reference`` raised to float64, or found in float32).

Every member is bounded by what its header declares, and the declared shapes must fit one
another (and the model, when known) before any data is inflated; other members are checked
by header only, never inflated.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from ..npzfile import check_array, read_npz
from .sublayers import SUBLAYERS

PREFIX = "sublayers."
USED = ("input_ids", "logits", "hidden_states", "context_positions", "reference_kind", "islands")
"""The members the audit reads (besides ``sublayers.<name>``); others are never inflated."""

BATCH_AXIS = {"input_ids": (0, 2), "logits": (0, 3), "hidden_states": (1, 4)}
"""member -> (axis of Hugging Face's batch dimension, rank with it) (sublayers: axis 1 of 4)."""


def _used(name):
    return name in USED or (name.startswith(PREFIX) and name[len(PREFIX):] in SUBLAYERS)


def _batch_axis(name):
    return BATCH_AXIS.get(name, (1, 4) if name.startswith(PREFIX) else (None, None))


def _unbatch_shape(path, name, shape):
    """``shape`` without HF's batch axis of one; a batch of several sequences is refused."""
    axis, rank = _batch_axis(name)
    if axis is None or len(shape) != rank:
        return shape, False
    if shape[axis] != 1:
        raise ModelFileError(f"{path}: {name} {tuple(shape)} holds a batch of {shape[axis]} sequences; "
                             "a reference holds one (save row 0, or the batch of one [1, T])")
    return tuple(s for i, s in enumerate(shape) if i != axis), True


def _bound(path, headers, expect):
    """Refuse, before inflating anything, declared shapes that cannot fit the reference ([T],
    [T, V], [L+1, T, D], [C <= T], [L, T, W]) or the model (``expect``: vocab_size, n_layers,
    d_model, d_ff)."""
    shapes = {k: _unbatch_shape(path, k, h[0])[0] for k, h in headers.items()}
    ids, lg, hs, cp = (shapes.get(k) for k in ("input_ids", "logits", "hidden_states", "context_positions"))
    T = ids[0] if ids is not None and len(ids) == 1 else None
    if T is not None and lg is not None and len(lg) == 2 and lg[0] != T:
        raise ModelFileError(f"{path}: input_ids {ids} and logits {lg} do not fit [T], [T, V]")
    if lg is not None and len(lg) == 2 and expect.get("vocab_size") not in (None, lg[1]):
        raise ModelFileError(f"{path}: reference has {lg[1]} logits per token, the model {expect['vocab_size']}")
    L, D = expect.get("n_layers"), expect.get("d_model")
    if T is not None and hs is not None and len(hs) == 3:
        if hs[1] != T:
            raise ModelFileError(f"{path}: hidden_states {hs} is not [L+1, T, D] with T = {T}")
        if L is not None and (hs[0] != L + 1 or hs[2] != D):
            raise ModelFileError(f"reference hidden_states {hs} do not fit the model: [L+1, T, D] = "
                                 f"[{L + 1}, {T}, {D}]")
    for k, sh in shapes.items():
        if not k.startswith(PREFIX) or len(sh) != 3:
            continue
        width = expect.get("d_ff") if k == PREFIX + "mlp_hidden" else D
        if (T is not None and sh[1] != T) or (L is not None and sh[0] != L) or width not in (None, sh[2]):
            raise ModelFileError(f"{path}: {k} {sh} does not fit [L, T, W] = [{L}, {T}, {width}]")
    if T is not None and cp is not None and len(cp) == 1 and cp[0] > T:
        raise ModelFileError(f"{path}: context_positions has {cp[0]} entries for {T} tokens")


def load_reference(path, vocab_size=None, n_layers=None, d_model=None, d_ff=None):
    """(arrays, notes) of the reference file ``path``: see :func:`read_reference`; ``notes`` is a
    list of hints for the report (a batch of one read as one sequence, the reference's dtype)."""
    path = Path(path)
    expect = dict(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, d_ff=d_ff)
    ref = read_npz(path, _used, "reference file", lambda p, h: _bound(p, h, expect))
    notes = []
    for k in list(ref):
        shape, squeezed = _unbatch_shape(path, k, ref[k].shape)
        if squeezed:
            ref[k] = ref[k].reshape(shape)
            if not notes:
                notes.append("the reference holds Hugging Face's batch of one ([1, T], [1, T, V], ...): "
                             "read as one sequence")
    for k in ("input_ids", "logits"):
        if k not in ref:
            raise ModelFileError(f"{path}: missing key {k!r} (keys: {sorted(ref)})")
    check_array(path, "input_ids", ref["input_ids"], 1, "iu")
    check_array(path, "logits", ref["logits"], 2, "f")
    ids, lg = ref["input_ids"], ref["logits"]
    T = ids.shape[0]
    if T == 0 or lg.shape[0] != T or lg.shape[1] == 0:
        raise ModelFileError(f"{path}: input_ids {ids.shape} and logits {lg.shape} do not fit [T], [T, V]")
    if not np.any(lg):
        raise ModelFileError(f"{path}: logits are all zero: no scale to measure relative errors")
    hs = ref.get("hidden_states")
    if hs is not None:
        check_array(path, "hidden_states", hs, 3, "f")
        if hs.shape[0] == 0 or hs.shape[1] != T or hs.shape[2] == 0:
            raise ModelFileError(f"{path}: hidden_states {hs.shape} is not [L+1, T, D] with T = {T}")
        zero = [i for i in range(hs.shape[0]) if not np.any(hs[i])]
        if zero:
            raise ModelFileError(f"{path}: hidden_states[{zero[0]}] is all zero: no scale for relative errors")
    layers = {ref[k].shape[0] for k in ref if k.startswith(PREFIX) and ref[k].ndim}
    for k in sorted(k for k in ref if k.startswith(PREFIX)):
        check_array(path, k, ref[k], 3, "f")
        if ref[k].shape[1] != T or len(layers) != 1 or (hs is not None and ref[k].shape[0] != hs.shape[0] - 1):
            raise ModelFileError(f"{path}: {k} {ref[k].shape} is not [L, T, W] with T = {T} and the same L "
                                 "as the other sublayers and hidden_states")
    cp = ref.get("context_positions")
    if cp is not None:
        check_array(path, "context_positions", cp, 1, "iu")
        if cp.size and (cp.min() < 0 or cp.max() >= T):
            raise ModelFileError(f"{path}: context_positions must lie in [0, {T}), got [{cp.min()}, {cp.max()}]")
        if np.unique(cp).size != cp.size:
            raise ModelFileError(f"{path}: context_positions contain duplicates")
    if "reference_kind" in ref:
        check_array(path, "reference_kind", ref["reference_kind"], 0, "U")
    if "islands" in ref:
        check_array(path, "islands", ref["islands"], 1, "U")
    notes += dtype_notes(ref)
    return ref, notes


def dtype_notes(ref):
    """What tolerance the reference's own precision allows (hints; the audit still uses --rtol)."""
    kind = str(ref["reference_kind"][()]) if "reference_kind" in ref else None
    if ref["logits"].dtype != np.float64 or kind == "stock-float32":
        return [f"the reference is {ref['logits'].dtype}: rounding alone reaches ~1e-6 relative; audit it "
                "with --rtol 1e-4 (the float32 bar, MATH.md section 8), or make a float64 one "
                "(python -m minipatch reference CHECKPOINT --out REF.npz)"]
    if kind == "stock-float64":
        return ["the reference is stock Hugging Face in float64, which still computes RMSNorm, RoPE and the "
                "softmax in float32 (its 'islands' member lists them): expect ~1e-7 relative from there; "
                "audit it with --rtol 1e-5, or make a true float64 one (drop --stock)"]
    return []


def read_reference(path, vocab_size=None, n_layers=None, d_model=None, d_ff=None):
    """The reference arrays of ``path`` (.npz), validated; read without unpickling anything.

    Returns a dict with ``input_ids`` [T] (integer), ``logits`` [T, V] (finite, not all zero)
    and, if present, ``hidden_states`` [L+1, T, D], ``context_positions`` [C] (distinct, in
    [0, T)), ``sublayers.<name>`` [L, T, W], ``reference_kind`` and ``islands`` (text).
    Hugging Face's batch of one is read as one sequence. Other members (e.g. a fixture's
    ``logits_stock``) must be plain arrays whose size matches their header, but are never
    inflated. The declared shapes must fit one another (and ``vocab_size``, ``n_layers``,
    ``d_model``, ``d_ff`` of the model, if given) before any data is inflated. Raises
    ``ModelFileError`` naming the problem (also for a reference too large to allocate).
    """
    return load_reference(path, vocab_size, n_layers, d_model, d_ff)[0]
