"""The KV cache of :meth:`~minipatch.model.Model.prefill` and :meth:`~minipatch.model.Model.step`:
keys and values of every layer for the tokens run so far."""
from __future__ import annotations

import numpy as np

from .backend import device, namespace
from .blocks.base import KV


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
