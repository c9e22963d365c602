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
from .binding import check_patches
from .blocks import attention_values, layer_shapes, mlp_values, spec_for
from .cache import Cache
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


def numpy_logits(model, tokens, **kw):
    """Convenience for notebooks: logits as a numpy array whatever the backend."""
    return to_numpy(model.forward(tokens, **kw))
