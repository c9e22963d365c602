"""The decoder stack: embedding, blocks, final norm, head (picoGPT-style functional core).

Parameters live in a plain dict: top-level ``embed.weight`` [V, D], optional
``pos_embed.weight`` [P, D] (learned positions), ``final_norm.weight`` (+``.bias``),
optional ``lm_head.weight`` [V, D] (untied), and ``layers``: a list of L dicts with the
per-layer names of ``minipatch.blocks.base.layer_shapes``. The loaders' tables map every
Hugging Face name onto these.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import device, namespace, to, to_numpy
from .blocks import attention_values, layer_shapes, mlp_values, spec_for
from .blocks.base import KV
from .errors import InputError, NonFiniteError, ShapeError
from .finite import all_finite, check_values, first_row, quiet
from .ops import softcap
from .patches import norm
from .validate import check_positions, check_tokens


def top_shapes(cfg):
    """name -> shape of the non-layer parameters."""
    s = {"embed.weight": (cfg.vocab_size, cfg.d_model), "final_norm.weight": (cfg.d_model,)}
    if cfg.norm == "layer":
        s["final_norm.bias"] = (cfg.d_model,)
    if cfg.pos_embedding == "learned":
        s["pos_embed.weight"] = (cfg.max_positions, cfg.d_model)
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    if cfg.extra.get("head_bias"):      # GPT-J, Phi: the output head has a bias
        s["lm_head.bias"] = (cfg.vocab_size,)
    return s


class Model:
    """A decoder-only transformer of any declared family; immutable in use.

    Args:
      cfg: :class:`~minipatch.config.ModelConfig`.
      params: the parameter dict described in the module docstring (numpy, CuPy or any
        array-API arrays, one floating dtype). Shapes are checked against the config.
    """

    def __init__(self, cfg, params):
        self.cfg = cfg
        self.spec = spec_for(cfg)
        self.params = params
        self._check_params()

    # -- construction helpers --------------------------------------------------------------
    def _check_params(self):
        p, cfg = self.params, self.cfg
        if "layers" not in p or len(p["layers"]) != cfg.n_layers:
            raise ShapeError(f"params need a 'layers' list of {cfg.n_layers} dicts")
        want = [(k, s, p.get(k)) for k, s in top_shapes(cfg).items()]
        lshapes = layer_shapes(self.spec, cfg)
        for i, lp in enumerate(p["layers"]):
            want += [(f"layers.{i}.{k}", s, lp.get(k)) for k, s in lshapes.items()]
        dtypes = set()
        for name, shape, arr in want:
            if arr is None:
                raise ShapeError(f"missing parameter {name} (expected shape {shape})")
            if tuple(arr.shape) != tuple(shape):
                raise ShapeError(f"parameter {name} has shape {tuple(arr.shape)}, expected {shape}")
            dtypes.add(str(arr.dtype))
        if len(dtypes) != 1:
            raise ShapeError(f"parameters mix dtypes {sorted(dtypes)}")

    @property
    def dtype(self):
        return self.params["embed.weight"].dtype

    @property
    def xp(self):
        return namespace(self.params["embed.weight"])

    def astype(self, dtype):
        """A copy of the model with floating parameters cast to ``dtype`` (float32/float64)."""
        from .validate import check_float_dtype

        return Model(self.cfg, to(self.params, dtype=check_float_dtype(dtype).name))

    def to(self, xp, dev=None):
        """A copy of the model on another array namespace / device (e.g. cupy, array_api_strict)."""
        return Model(self.cfg, to(self.params, xp, dev))

    def save_pretrained(self, path, extra=None):
        """Write this model as a Hugging Face folder (config.json + model.safetensors); see
        :func:`minipatch.io.export.save_pretrained`."""
        from .io.export import save_pretrained

        return save_pretrained(self, path, extra)

    def head_weight(self):
        return self.params.get("lm_head.weight", self.params["embed.weight"])

    # -- forward ---------------------------------------------------------------------------
    def _inputs(self, tokens, positions):
        t = check_tokens(tokens, self.cfg.vocab_size)
        limit = self.cfg.max_positions if self.cfg.pos_embedding == "learned" else 1 << 62
        p = check_positions(positions, t.size, limit)
        xp, dev = self.xp, device(self.params["embed.weight"])
        return xp.asarray(t, device=dev), xp.asarray(p, device=dev), p

    def embed(self, tok, pos):
        """x_0 [T, D] = E[tokens] (* sqrt(D) for Gemma, in the model dtype) (+ P[positions])."""
        xp, p = self.xp, self.params
        x = xp.take(p["embed.weight"], tok, axis=0)
        if self.cfg.embed_scale:
            x = x * xp.asarray(math.sqrt(self.cfg.d_model), dtype=x.dtype, device=device(x))
        if self.cfg.pos_embedding == "learned":
            x = x + xp.take(p["pos_embed.weight"], pos, axis=0)
        return x

    def run(self, tokens, positions=None, patches=None, trace=None, head=True, window_by="position"):
        """The stack; returns logits [T, V] (``head=True``) or the final normed hidden [T, D].

        Args:
          tokens: int [T]. positions: int [T] strictly increasing (default 0..T-1).
          patches: :class:`~minipatch.patches.Patches` for exactly these positions.
          trace: optional dict, filled with ``embed``, ``layers`` (per-layer dicts of x, a, z,
            h, d, m, out and o, the o_proj output), ``hidden_states`` (HF layout: [0] embedding, [i] after layer i,
            [L] after the final norm) and ``final``.
          window_by: 'position' (a sliding window counts original positions, the meaning of
            "context removed") or 'index' (Hugging Face's sequence-index convention).
        """
        tok, pos, pos_host = self._inputs(tokens, positions)
        index = self._index(window_by, 0, pos.shape[0])
        layers = self._patch_layers(patches, pos_host, window_by)
        xf, _ = self._stack(self.embed(tok, pos), pos, layers, index, None, trace)
        return self.logits(xf) if head else xf

    # -- the layer loop, shared by run / prefill / step ------------------------------------
    def _index(self, window_by, start, n):
        if window_by not in ("position", "index"):
            raise InputError(f"window_by must be 'position' or 'index', got {window_by!r}")
        if window_by == "position":
            return None
        return self.xp.arange(start, start + n, device=device(self.params["embed.weight"]))

    def _patch_layers(self, patches, pos_host, window_by):
        if patches is None:
            return None
        check_patches(patches, self, pos_host, window_by)
        return patches.layers

    def _stack(self, x, pos, layers, index, cache, trace, final=True):
        """Every block on x [T, D] (after the cached tokens of ``cache``, a :class:`Cache` or
        None); returns (final normed hidden [T, D], per-layer (k, v) of these tokens).
        ``final=False``: the last block's output instead, without the final norm (streams)."""
        with quiet():
            return self._layers(x, pos, layers, index, cache, trace, final)

    def _layers(self, x, pos, layers, index, cache, trace, final=True):
        kvs, rows, hidden = [], [], [x]
        for l, lp in enumerate(self.params["layers"]):
            patch = layers[l] if layers is not None else None
            past = cache.past(l) if cache is not None else None
            at = attention_values(self.spec, lp, x, self.cfg, l, pos, patch, index, past)
            ml = mlp_values(self.spec, lp, x, at.z, at.a, self.cfg, patch)
            if not all_finite(ml.out):
                check_values(dict(x=x, a=at.a, z=at.z, h=ml.h, d=ml.d, m=ml.m, out=ml.out), l, to_numpy(pos))
            if trace is not None:
                rows.append(dict(x=x, a=at.a, z=at.z, h=ml.h, d=ml.d, m=ml.m, out=ml.out, o=at.o))
                hidden.append(ml.out)
            kvs.append((at.k, at.v))
            x = ml.out
        if not final:
            if trace is not None:
                trace.update(embed=hidden[0], layers=rows, hidden_states=hidden, final=x, final_prenorm=x)
            return x, kvs
        xf = norm(self.params, "final_norm", x, self.cfg)
        if not all_finite(xf):
            raise NonFiniteError("final norm output", position=int(to_numpy(pos)[first_row(xf)]),
                                 hint="check final_norm.weight")
        if trace is not None:
            if self.cfg.n_layers:
                hidden[-1] = xf
            trace.update(embed=hidden[0], layers=rows, hidden_states=hidden, final=xf, final_prenorm=x)
        return xf, kvs

    # -- incremental decoding (KV cache) ---------------------------------------------------
    def prefill(self, tokens, positions=None, patches=None, window_by="position", trace=None, head=True):
        """Run ``tokens`` and keep every layer's keys and values for :meth:`step`.

        Returns:
          (logits [V] of the last token, or its final hidden [D] with ``head=False``;
          :class:`Cache`). ``trace`` as in :meth:`run`.
        """
        tok, pos, pos_host = self._inputs(tokens, positions)
        index = self._index(window_by, 0, pos.shape[0])
        layers = self._patch_layers(patches, pos_host, window_by)
        xf, kvs = self._stack(self.embed(tok, pos), pos, layers, index, None, trace)
        cache = Cache.empty(self, window_by).extend(kvs, pos, pos_host)
        return (self.logits(xf[-1:, ...])[0, ...] if head else xf[-1, ...]), cache

    def step(self, cache, token, position=None, patches=None, trace=None, head=True):
        """One more token after the cached ones: (logits [V], the extended :class:`Cache`).

        Equal to the last row of :meth:`forward` on the whole sequence (float64: to ~1e-15).
        ``cache`` is not changed: stepping twice from the same cache gives two branches.

        Args:
          token: one token id (or an int [T'] array of several, which are run together).
          position: its position (default: one after the last cached one); several tokens
            take an int [T'] array.
          patches: :class:`~minipatch.patches.Patches` for exactly these new positions.
          head: False returns the last final hidden [D] instead of logits.
        """
        tokens = [token] if np.ndim(token) == 0 else token
        t = check_tokens(tokens, self.cfg.vocab_size)
        if position is None:
            position = np.arange(t.size, dtype=np.int64) + (cache.last + 1)
        elif np.ndim(position) == 0:
            position = [position]
        tok, pos, pos_host = self._inputs(t, position)
        if pos_host[0] <= cache.last:
            raise InputError(f"step position {int(pos_host[0])} is not after the cached position {cache.last}")
        if cache.n_layers != self.cfg.n_layers:
            raise InputError("this cache was made by another model")
        index = self._index(cache.window_by, cache.n, pos.shape[0])
        layers = self._patch_layers(patches, pos_host, cache.window_by)
        xf, kvs = self._stack(self.embed(tok, pos), pos, layers, index, cache, trace)
        out = self.logits(xf[-1:, ...])[0, ...] if head else xf[-1, ...]
        return out, cache.extend(kvs, pos, pos_host)

    def logits(self, xf):
        """[T, V] = final hidden @ head^T (+ head bias), soft-capped when the config says so."""
        y = xf @ self.head_weight().mT
        b = self.params.get("lm_head.bias")
        return softcap(y if b is None else y + b, self.cfg.final_softcap)

    def forward(self, tokens, positions=None, patches=None, trace=None, window_by="position"):
        """Logits [T, V]; see :meth:`run`."""
        return self.run(tokens, positions, patches, trace, True, window_by)

    __call__ = forward

    def n_params(self):
        total = sum(int(np.prod(a.shape)) for k, a in self.params.items() if k != "layers")
        return total + sum(int(np.prod(a.shape)) for lp in self.params["layers"] for a in lp.values())

    def __repr__(self):
        return (f"Model({self.cfg.family}, L={self.cfg.n_layers}, D={self.cfg.d_model}, "
                f"V={self.cfg.vocab_size}, dtype={self.dtype})")


class Cache:
    """Keys and values of every layer for the tokens run so far (one model, one sequence).

    Functional: :meth:`extend` returns a new cache and never changes what an existing one
    sees. Buffers grow by doubling, so n steps cost O(n) copies in all; a cache that is
    extended a second time (a branch) copies its rows instead of overwriting the first
    branch's.

    Attributes:
      n: tokens cached. positions: numpy int64 [n]. last: the last position (-1 if none).
      window_by: the sliding-window convention the keys were made with.
    """

    def __init__(self, n, positions, bufs, pos_buf, window_by, fill):
        self.n, self.positions, self._bufs, self._pos = n, positions, bufs, pos_buf
        self.window_by, self._fill = window_by, fill

    @classmethod
    def empty(cls, model, window_by="position"):
        return cls(0, np.zeros(0, np.int64), [None] * model.cfg.n_layers, None, window_by, [0])

    @property
    def last(self):
        return int(self.positions[-1]) if self.n else -1

    @property
    def n_layers(self):
        return len(self._bufs)

    def past(self, layer):
        """The :class:`~minipatch.blocks.base.KV` of layer ``layer`` (None when empty)."""
        if self.n == 0:
            return None
        kb, vb = self._bufs[layer]
        xp = namespace(kb)
        idx = xp.arange(self.n, device=device(kb)) if self.window_by == "index" else None
        return KV(kb[: self.n, ...], vb[: self.n, ...], self._pos[: self.n], idx)

    def extend(self, kvs, pos, pos_host):
        """A cache with the per-layer (k [T, K, H], v) of T more tokens at ``pos`` appended."""
        n, t = self.n, int(pos_host.shape[0])
        first = kvs[0][0] if kvs else None
        cap = 0 if self._pos is None else self._pos.shape[0]
        if first is None:                       # a model without layers
            return Cache(n + t, np.concatenate([self.positions, pos_host]), self._bufs, self._pos,
                         self.window_by, self._fill)
        xp = namespace(first)
        if self._fill[0] == n and n + t <= cap:  # append in place: nobody else sees rows >= n
            bufs, pos_buf, fill = self._bufs, self._pos, self._fill
        else:                                   # grow (doubling) or branch: copy rows < n
            cap = max(16, 2 * (n + t))
            dev = device(first)
            bufs = []
            for l, (k, v) in enumerate(kvs):
                kb = xp.zeros((cap,) + tuple(k.shape[1:]), dtype=k.dtype, device=dev)
                vb = xp.zeros((cap,) + tuple(v.shape[1:]), dtype=v.dtype, device=dev)
                if n:
                    kb[:n, ...], vb[:n, ...] = self._bufs[l][0][:n, ...], self._bufs[l][1][:n, ...]
                bufs.append((kb, vb))
            pos_buf = xp.zeros((cap,), dtype=pos.dtype, device=dev)
            if n:
                pos_buf[:n] = self._pos[:n]
            fill = [n]
        for (kb, vb), (k, v) in zip(bufs, kvs):
            kb[n:n + t, ...], vb[n:n + t, ...] = k, v
        pos_buf[n:n + t] = pos
        fill[0] = n + t
        return Cache(n + t, np.concatenate([self.positions, pos_host]), bufs, pos_buf, self.window_by, fill)


def check_patches(patches, model, positions, window_by="position"):
    """Refuse patches that were not made for this model, these positions and this window
    convention (:class:`~minipatch.errors.PatchMismatchError`). An
    :class:`~minipatch.absorb.AbsorbResult` is accepted for its ``.patches``."""
    from .errors import PatchMismatchError

    patches = getattr(patches, "patches", patches)
    if not hasattr(patches, "layers") or not hasattr(patches, "check"):
        raise InputError(f"patches must be a minipatch Patches (or an AbsorbResult), got {type(patches).__name__}")
    patches.check(model.cfg.n_layers, positions.shape[0])
    _check_patch_shapes(patches, model)
    if patches.positions is not None and not np.array_equal(np.asarray(patches.positions), positions):
        raise PatchMismatchError(
            f"patches were made for positions {np.asarray(patches.positions).tolist()}, "
            f"not {positions.tolist()}")
    made = getattr(patches, "origin", None)
    if made is not None:
        here = fingerprint(model)
        for key in ("family", "config", "params", "dtype"):
            if made.get(key) != here.get(key):
                raise PatchMismatchError(f"patches were made for another model ({key} differs: "
                                         f"{made.get(key)!r} vs {here.get(key)!r})")
        if made.get("window_by", window_by) != window_by:
            raise PatchMismatchError(f"patches were made with window_by={made['window_by']!r}, "
                                     f"applied with window_by={window_by!r}")


def _check_patch_shapes(patches, model):
    """Every patched parameter exists in its layer, and every factor has that parameter's widths."""
    from .patches import PATCHED_NORMS, Dense, Rank1, Scale, Shift, patch_kind_ok

    for l, lp in enumerate(patches.layers):
        params = model.params["layers"][l]
        for name, p in lp.items():
            w = params.get(name)
            if w is None:
                raise ShapeError(f"patch of layer {l} names {name!r}, which this {model.cfg.family} layer "
                                 f"does not have (patches made for another family?)")
            shape = tuple(w.shape)
            if not patch_kind_ok(name, p):
                raise InputError(f"a {type(p).__name__} patch of {name!r} in layer {l}: the forward applies "
                                 "Rank1/Dense patches to linear weights, Shift to their biases and Scale to "
                                 f"the norms {', '.join(PATCHED_NORMS)} only")
            if isinstance(p, Rank1):
                want = [("u", p.u, shape[:-1]), ("v", p.v, shape[-1:])]
            elif isinstance(p, (Shift, Dense)):
                want = [("d", p.d, shape)]
            elif isinstance(p, Scale):
                want = [("add", p.add, shape), ("mul", p.mul, (1,))]
            else:
                raise InputError(f"patch of {name!r} in layer {l} is a {type(p).__name__}, not "
                                 "Rank1/Dense/Shift/Scale")
            for field, a, tail in want:
                if a is None:
                    continue
                got = tuple(a.shape[1:])
                ok = got == tail or (field == "v" and got == shape[:-2] + tail)   # experts: v [T, E, in]
                if not ok:
                    raise ShapeError(f"patch {field} of {name!r} in layer {l} has widths {got}, the parameter "
                                     f"{tuple(shape)} needs {tail}")
                if str(a.dtype) != str(w.dtype):
                    from .errors import PatchMismatchError

                    raise PatchMismatchError(f"patch {field} of {name!r} in layer {l} is {a.dtype}, the model "
                                             f"is {w.dtype}")


def fingerprint(model):
    """What patches record about the model that made them: family, config digest, dtype and a
    cheap parameter digest (a few strided values of every parameter), cached per model."""
    fp = model.__dict__.get("_fingerprint")
    if fp is None:
        import hashlib

        cfg = hashlib.sha256(repr(model.cfg).encode()).hexdigest()[:16]
        h = hashlib.sha256()
        items = sorted((k, v) for k, v in model.params.items() if k != "layers")
        items += [(f"layers.{i}.{k}", v) for i, lp in enumerate(model.params["layers"]) for k, v in sorted(lp.items())]
        for name, a in items:
            flat = namespace(a).reshape(a, (-1,))
            stride = max(1, flat.shape[0] // 64)
            h.update(name.encode())
            h.update(np.ascontiguousarray(to_numpy(flat[::stride]), dtype=np.float64).tobytes())
        fp = {"family": model.cfg.family, "config": cfg, "params": h.hexdigest()[:16], "dtype": str(model.dtype)}
        model.__dict__["_fingerprint"] = fp
    return fp


def numpy_logits(model, tokens, **kw):
    """Convenience for notebooks: logits as a numpy array whatever the backend."""
    return to_numpy(model.forward(tokens, **kw))
