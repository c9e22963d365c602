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
from .blocks import block_forward, layer_shapes, spec_for
from .errors import InputError, ShapeError
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
        from .backend import as_float_dtype

        as_float_dtype(np, dtype)
        return Model(self.cfg, to(self.params, dtype=dtype))

    def to(self, xp, dev=None):
        """A copy of the model on another array namespace / device (e.g. cupy, array_api_strict)."""
        return Model(self.cfg, to(self.params, xp, dev))

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
            h, m, out), ``hidden_states`` (HF layout: [0] embedding, [i] after layer i,
            [L] after the final norm) and ``final``.
          window_by: 'position' (a sliding window counts original positions, the meaning of
            "context removed") or 'index' (Hugging Face's sequence-index convention).
        """
        tok, pos, pos_host = self._inputs(tokens, positions)
        if window_by not in ("position", "index"):
            raise InputError(f"window_by must be 'position' or 'index', got {window_by!r}")
        index = self.xp.arange(pos.shape[0], device=device(pos)) if window_by == "index" else None
        if patches is not None:
            patches.check(self.cfg.n_layers, pos.shape[0])
            if patches.positions is not None and not np.array_equal(np.asarray(patches.positions), pos_host):
                raise InputError(
                    f"patches were made for positions {np.asarray(patches.positions).tolist()}, "
                    f"not {pos_host.tolist()}")
        x = self.embed(tok, pos)
        layers = [] if trace is not None else None
        hidden = [x] if trace is not None else None
        for l, lp in enumerate(self.params["layers"]):
            tr = {} if trace is not None else None
            x = block_forward(self.spec, lp, x, self.cfg, l, pos,
                              patches.layers[l] if patches is not None else None, tr, index)
            if trace is not None:
                layers.append(tr)
                hidden.append(x)
        xf = norm(self.params, "final_norm", x, self.cfg)
        if trace is not None:
            hidden[-1] = xf if self.cfg.n_layers else hidden[-1]
            trace.update(embed=hidden[0], layers=layers, hidden_states=hidden, final=xf,
                         final_prenorm=x)
        if not head:
            return xf
        return self.logits(xf)

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
