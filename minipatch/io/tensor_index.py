"""A checkpoint's tensor index (names, dtypes, shapes; no data) against its config: refused
before any tensor data is read when they disagree (MATH.md section 7's named errors)."""
from __future__ import annotations

import re

from ..errors import ModelFileError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "float64", "float32", "float16"}
"""Stored dtypes a weight may have (safetensors names and numpy names)."""


def layer_indices(names, table):
    """The layer indices named by tensors matching a per-layer pattern of ``table`` (HF names)."""
    prefixes = sorted({k.split("{i}")[0] for k in table if "{i}" in k})
    rx = re.compile("^(?:" + "|".join(re.escape(p) for p in prefixes) + r")(\d+)\.")
    out = set()
    for name in names:
        m = rx.match(name)
        if m:
            out.add(int(m.group(1)))
    return out


def check_tensor_index(cfg, table, index, ignored, expected, source=None):
    """Refuse, before any tensor data is read, a checkpoint whose index disagrees with ``cfg``.

    Args:
      cfg: the ModelConfig.
      table: the family's name table (HF name pattern -> target, ``minipatch.io.hf_tables``).
      index: HF name -> (dtype name, shape).
      ignored: compiled regexes of buffers the loader skips.
      expected: internal name -> shape (``layers.{i}.`` prefixed for per-layer parameters).
    Raises:
      ModelFileError naming the tensor: a non-floating dtype (an integer checkpoint for a float
      model), a shape other than the config implies, an expert index outside num_experts.
    """
    where = f"{source}: " if source else ""
    rules = []
    for pat, target in table.items():
        rx = re.escape(pat).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        rules.append((re.compile("^" + rx + "$"), target))
    for name, (dt, shape) in index.items():
        if any(rx.match(name) for rx in ignored):
            continue
        if dt not in FLOAT_DTYPES:
            raise ModelFileError(f"{where}tensor {name!r} is stored as {dt}; a model's weights must be floating "
                                 f"point ({', '.join(sorted(d for d in FLOAT_DTYPES if d.isupper()))})")
        for rx, target in rules:
            m = rx.match(name)
            if m:
                break
        else:
            continue             # unexpected names are refused by the mapping
        if not isinstance(target, (str, tuple)):
            continue             # fused tensors (split by the loader) are checked after the split
        internal = target if isinstance(target, str) else target[0]
        want_shape = tuple(shape) if isinstance(target, str) else tuple(reversed(shape))
        if "{e}" in internal:
            e = int(m.group("e"))
            if e >= cfg.n_experts:
                raise ModelFileError(f"{where}tensor {name!r} names expert {e}; the config has "
                                     f"{cfg.n_experts} experts")
            internal = internal.replace("experts.{e}.", "experts.")
        key = (f"layers.{m.group('i')}." if "(?P<i>" in rx.pattern else "") + internal
        if key not in expected:
            continue             # e.g. lm_head of a tied model, biases the family lacks: refused later
        exp = expected[key][1:] if "{e}" in (target if isinstance(target, str) else target[0]) else expected[key]
        if tuple(exp) != want_shape:
            shown = tuple(exp) if isinstance(target, str) else tuple(reversed(exp))
            raise ModelFileError(
                f"{where}tensor {name!r} has shape {tuple(shape)}; the config implies {shown} (vocab "
                f"{cfg.vocab_size}, hidden {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads of "
                f"{cfg.d_head}, intermediate {cfg.d_ff}" + (f", {cfg.n_experts} experts" if cfg.n_experts else "")
                + ")")
