"""Patches as data: factored rank-1 weight patches, bias shifts and norm-scale patches.

A patch never edits a parameter. Applying it to an input yields new values; the dense
matrix of one token's patch is built only on request (:meth:`Rank1.dense`).

A *layer patch* is a plain dict from a parameter name (the model's internal names, e.g.
``'gate_proj.weight'``, ``'mlp_post_norm.weight'``) to one of the classes below; a
:class:`Patches` holds one layer patch per layer and the kept positions it was made for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import device, namespace, to_numpy
from .errors import ShapeError

PATCHED_NORMS = ("attn_post_norm.weight", "mlp_post_norm.weight", "attn_res_norm.weight", "mlp_res_norm.weight")
"""The norm multipliers the forward applies a :class:`Scale` patch to (every other norm reads none)."""


def patch_kind_ok(name, patch):
    """True if the forward applies ``patch`` to the parameter ``name``: Rank1 / Dense on a linear
    weight, Shift on a linear bias, Scale on one of :data:`PATCHED_NORMS`."""
    if "norm" in name:
        return isinstance(patch, Scale) and name in PATCHED_NORMS
    if name.endswith(".bias"):
        return isinstance(patch, Shift)
    return name.endswith(".weight") and isinstance(patch, (Rank1, Dense))


@dataclass(frozen=True)
class Rank1:
    """Token-dependent rank-1 patch dW_t = u_t v_t^T on a weight W [out, in] (MATH.md M1, M2).

    Applied to inputs x [T, in]: x W^T + u (v . x), never forming dW (cost O(T (in + out))).
    For stacked expert weights W [E, out, in], u is [T, E, out] and v is [T, in] (shared
    input) or [T, E, in].

    Attributes:
      u: [T, out] or [T, E, out].
      v: [T, in] or [T, E, in].
    """

    u: object
    v: object

    def apply(self, x, y):
        """y + u (v . x): the patched output given the unpatched output ``y = x W^T``."""
        xp = namespace(x, self.v)
        s = xp.sum(self.v * x, axis=-1, keepdims=True)
        if y.ndim > s.ndim:
            s = xp.reshape(s, s.shape[:-1] + (1,) * (y.ndim - s.ndim) + (1,))
        return y + self.u * s

    def dense(self, t):
        """The dense patch of kept token ``t``: [out, in] (or [E, out, in])."""
        xp = namespace(self.u)
        u, v = self.u[t, ...], self.v[t, ...]
        if v.ndim < u.ndim:
            v = xp.broadcast_to(v, u.shape[:-1] + v.shape[-1:])
        return u[..., :, None] * v[..., None, :]

    @property
    def n_tokens(self):
        return self.u.shape[0]


@dataclass(frozen=True)
class Dense:
    """Token-dependent dense weight patch dW_t, of any rank (another implementation's patches,
    read from a patch file; minipatch's own constructions are :class:`Rank1`).

    Applied to inputs x [T, in] (or [T, E, in] for experts): x W^T + dW_t x, cost O(T out in).

    Attributes:
      d: [T, out, in] or [T, E, out, in].
    """

    d: object

    def apply(self, x, y):
        xp = namespace(x, self.d)
        shape = (x.shape[0],) + (1,) * (self.d.ndim - x.ndim - 1) + tuple(x.shape[1:-1]) + (1, x.shape[-1])
        return y + xp.sum(self.d * xp.reshape(x, shape), axis=-1)

    def dense(self, t):
        return self.d[t, ...]

    @property
    def n_tokens(self):
        return self.d.shape[0]


@dataclass(frozen=True)
class Shift:
    """Token-dependent bias patch b -> b + d_t (MATH.md M4, and the bias witness of M8). d: [T, out]."""

    d: object

    def apply(self, x, y):
        return y + self.d

    def dense(self, t):
        return self.d[t, ...]

    @property
    def n_tokens(self):
        return self.d.shape[0]


@dataclass(frozen=True)
class Scale:
    """Token-dependent patch of a norm multiplier s = offset + g (MATH.md M6).

    The patched multiplier of token t is ``(s + add_t) * mul_t``: ``add`` [T, D] is M6a's
    elementwise patch (and M6c's residual), ``mul`` [T, 1] is M6b's one scalar per token.
    Either may be None.
    """

    add: object = None
    mul: object = None

    def multiplier(self, s):
        """The patched multiplier [T, D] given the unpatched one ``s`` [D]."""
        m = s if self.add is None else s + self.add
        return m if self.mul is None else m * self.mul

    def dense(self, t):
        return {"add": None if self.add is None else self.add[t, ...],
                "mul": None if self.mul is None else self.mul[t, ...]}

    @property
    def n_tokens(self):
        return (self.add if self.add is not None else self.mul).shape[0]


@dataclass(frozen=True)
class Patches:
    """One layer patch (dict name -> Rank1 | Shift | Scale) per layer, for the kept positions.

    Attributes:
      layers: tuple of L dicts.
      positions: numpy int64 [T_K], the kept positions these patches were made for.
      methods: per-layer name of the construction used (e.g. 'm6a').
      origin: what made them (None: unbound): the model's fingerprint (family, config and
        parameter digests, dtype), ``window_by`` and ``order``. Applying them to another
        model or convention raises :class:`~minipatch.errors.PatchMismatchError`.
    """

    layers: tuple
    positions: object
    methods: tuple = ()
    origin: object = None

    def __len__(self):
        return len(self.layers)

    def save(self, path, context=None, input_ids=None, window_by=None):
        """Write these patches as a patch file (FORMATS.md; :func:`minipatch.patchfile.save_patches`)."""
        from .patchfile import save_patches

        return save_patches(self, path, context, input_ids, window_by)

    @classmethod
    def load(cls, path, model=None):
        """Read a patch file (FORMATS.md) without unpickling; with ``model``, every name and shape is
        checked against it before any data is read (:func:`minipatch.patchfile.load_patches`)."""
        from .patchfile import load_patches

        return load_patches(path, model).patches

    def check(self, n_layers, n_tokens):
        if len(self.layers) != n_layers:
            raise ShapeError(f"patches have {len(self.layers)} layers, the model has {n_layers}")
        for i, lp in enumerate(self.layers):
            for name, p in lp.items():
                if p.n_tokens != n_tokens:
                    raise ShapeError(
                        f"patch {name!r} of layer {i} is for {p.n_tokens} tokens, the input has {n_tokens}"
                    )

    def take(self, rows):
        """The patches of a subset of kept tokens (``rows`` index into ``positions``)."""
        return Patches(tuple(take_layer_rows(lp, rows) for lp in self.layers),
                       np.asarray(self.positions)[np.asarray(rows)], self.methods, self.origin)

    def norms(self):
        """Per layer, per parameter: numpy [T_K] Frobenius norm of each token's patch."""
        out = []
        for lp in self.layers:
            row = {}
            for name, p in lp.items():
                if isinstance(p, Rank1):
                    u, v = to_numpy(p.u), to_numpy(p.v)
                    if v.ndim < u.ndim:  # shared v across experts
                        v = np.broadcast_to(v[:, None, :], u.shape[:-1] + v.shape[-1:])
                    nu = np.linalg.norm(u, axis=-1)
                    nv = np.linalg.norm(v, axis=-1)
                    row[name] = np.sqrt(np.sum((nu * nv) ** 2, axis=tuple(range(1, nu.ndim))))
                elif isinstance(p, (Shift, Dense)):
                    row[name] = np.linalg.norm(to_numpy(p.d).reshape(p.n_tokens, -1), axis=-1)
                else:
                    parts = [to_numpy(a).reshape(p.n_tokens, -1) for a in (p.add, p.mul) if a is not None]
                    row[name] = np.linalg.norm(np.concatenate(parts, axis=-1), axis=-1)
            out.append(row)
        return out


def concat_patches(parts):
    """One :class:`Patches` for the kept tokens of several (in order), e.g. a stream's steps."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]

    def cat(ps):
        first = ps[0]
        xp = namespace(*(a for a in vars(first).values() if a is not None))
        return type(first)(*[None if getattr(first, f) is None else xp.concat([getattr(p, f) for p in ps], axis=0)
                             for f in vars(first)])

    layers = tuple({k: cat([pt.layers[l][k] for pt in parts]) for k in parts[0].layers[l]}
                   for l in range(len(parts[0].layers)))
    return Patches(layers, np.concatenate([np.asarray(p.positions) for p in parts]), parts[0].methods,
                   parts[0].origin)


def take_layer_rows(layer_patch, rows):
    """One layer patch (dict name -> Rank1 | Dense | Shift | Scale) at a subset of its token rows."""
    def sub(p):
        xp = namespace(*(a for a in vars(p).values() if a is not None))
        idx = xp.asarray(rows, device=_device_of(p))
        return type(p)(*[None if a is None else xp.take(a, idx, axis=0) for a in vars(p).values()])

    return {k: sub(p) for k, p in layer_patch.items()}


def stack_patches(parts):
    """One layer patch holding the rows of several (in order), which may come from different
    constructions: an entry one of them lacks is filled with its exact no-op (a zero rank-1
    or shift, a zero ``add``, a unit ``mul``), so every row is patched exactly as its own
    patch would patch it."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in dict.fromkeys(k for p in parts for k in p):
        have = next(p[name] for p in parts if name in p)
        fields = {}
        for f in vars(have):
            like = next((getattr(p[name], f) for p in parts if name in p and getattr(p[name], f) is not None), None)
            if like is None:
                fields[f] = None
                continue
            xp = namespace(like)
            fill = 1 if f == "mul" else 0
            fields[f] = xp.concat([getattr(p[name], f) if name in p and getattr(p[name], f) is not None
                                   else xp.full((_rows(p),) + tuple(like.shape[1:]), fill, dtype=like.dtype,
                                                device=device(like))
                                   for p in parts], axis=0)
        out[name] = type(have)(**fields)
    return out


def _rows(patch):
    for p in patch.values():
        for a in vars(p).values():
            if a is not None:
                return a.shape[0]
    return 0


def _device_of(p):
    for a in vars(p).values():
        if a is not None:
            return device(a)


# ---- applying patches inside a forward ---------------------------------------------------

def linear(params, name, x, patch=None):
    """x W^T + b for parameter ``name`` (``name.weight`` [out, in], optional ``name.bias``),
    with the layer patch's entries for that weight and bias applied in factored form."""
    w = params[name + ".weight"]
    y = x @ w.mT
    b = params.get(name + ".bias")
    if b is not None:
        y = y + b
    if patch:
        pw = patch.get(name + ".weight")
        if pw is not None:
            y = pw.apply(x, y)
        pb = patch.get(name + ".bias")
        if pb is not None:
            y = pb.apply(x, y)
    return y


def norm(params, name, x, cfg, patch=None, kind=None):
    """The model's norm (RMSNorm with ``cfg.norm_offset`` or LayerNorm) at parameter ``name``,
    with a :class:`Scale` patch on ``name.weight`` applied to the multiplier.

    Raises NonFiniteError where the mean square overflows although x is finite (float32
    streams beyond ~1e19; :mod:`minipatch.finite`).
    """
    from .finite import check_mean_square

    xp = namespace(x)
    kind = kind or cfg.norm
    g = params[name + ".weight"]
    s = g + cfg.norm_offset if (kind == "rms" and cfg.norm_offset) else g
    p = patch.get(name + ".weight") if patch else None
    if p is not None:
        s = p.multiplier(s)
    c = x if kind == "rms" else x - xp.mean(x, axis=-1, keepdims=True)
    with np.errstate(over="ignore"):      # an overflow is named just below, not warned about
        ms = xp.mean(c * c, axis=-1, keepdims=True)
    check_mean_square(x, ms)
    y = c / xp.sqrt(ms + cfg.norm_eps) * s
    if kind == "rms":
        return y
    b = params.get(name + ".bias")
    return y if b is None else y + b
