"""KV caches for the two graph layouts, kept in buffers allocated once per generation and
bound to ONNX Runtime with IO binding (no per-token allocation, no copies through numpy).

Both hold per-row `lengths [B]` (int64): row b's next token goes at position `lengths[b]`,
and its valid entries are the slots below it (a token's slot is its position), so rolling
a row back is lowering its length, as in `pangu_fn.cache.KVCache`.

- `GrowingCache` (target ort): the graph maps `past [B,H,P,D]` to `present [B,H,P+T,D]`. Two
  flat buffers per tensor are used in turn: past is read from one and present written into
  the other, each a prefix view of capacity `B*H*max_len*D`.
- `SharedCache` (target ort, graphs whose attention is GroupQueryAttention, manifest
  `cache.share_buffer`): one `[B,H,max_len,D]` buffer per tensor is bound as both past and
  present; the graph writes the T new entries of each row at its positions in place, so
  nothing is copied per token and rolling back needs no compaction.
- `StaticCache` (target ascend): fixed `[B,H,S,D]` buffers are the graph's past input; the
  graph returns only the T new entries, which are written into the buffers at the positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import GenerationError


class GrowingCache:
    def __init__(self, past: list[str], present: list[str], heads: list[int], head_dim: int,
                 dtype: np.dtype, batch: int, max_len: int) -> None:
        self.past, self.present, self.dtype = past, present, np.dtype(dtype)
        self.shapes = [(batch, h, head_dim) for h in heads for _ in (0, 1)]
        self.buffers = [[np.empty(batch * h * max_len * head_dim, self.dtype) for h in heads for _ in (0, 1)]
                        for _ in (0, 1)]
        # a prefix view starts where its buffer starts: the addresses never change
        self.pointers = [[b.__array_interface__["data"][0] for b in side] for side in self.buffers]
        self.max_len, self.filled, self.side = max_len, 0, 0
        self.lengths = np.zeros(batch, np.int64)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _view(self, side: int, i: int, length: int) -> np.ndarray:
        b, h, d = self.shapes[i]
        return self.buffers[side][i][: b * h * length * d].reshape(b, h, length, d)

    def bind(self, io: Any, T: int) -> None:
        """Bind past (the filled prefix) and present (T more slots) for a call with T tokens."""
        if int(self.lengths.max()) < self.filled:  # rows were rolled back: drop the stale tail
            self._compact(int(self.lengths.max()))
        if self.filled + T > self.max_len:
            raise GenerationError(f"cache: {self.filled} filled + {T} new positions exceed its "
                                  f"capacity {self.max_len}")
        src, dst = self.pointers[self.side], self.pointers[1 - self.side]
        for i, (name, out) in enumerate(zip(self.past, self.present)):
            b, h, d = self.shapes[i]
            io.bind_input(name, "cpu", 0, self.dtype, [b, h, self.filled, d], src[i])
            io.bind_output(out, "cpu", 0, self.dtype, [b, h, self.filled + T, d], dst[i])

    def advance(self, T: int) -> None:
        self.side, self.filled = 1 - self.side, self.filled + T
        self.lengths += T

    def _compact(self, keep: int) -> None:
        for i in range(len(self.shapes)):
            self._view(1 - self.side, i, keep)[...] = self._view(self.side, i, self.filled)[:, :, :keep]
        self.side, self.filled = 1 - self.side, keep


class SharedCache:
    def __init__(self, past: list[str], present: list[str], heads: list[int], head_dim: int,
                 dtype: np.dtype, batch: int, max_len: int) -> None:
        self.past, self.present, self.dtype = past, present, np.dtype(dtype)
        self.buffers = [np.zeros((batch, h, max_len, head_dim), self.dtype) for h in heads for _ in (0, 1)]
        self.max_len = max_len
        self.lengths = np.zeros(batch, np.int64)
        self._io: Any = None  # the binding of all rows, made once: the buffers never move

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def filled(self) -> int:
        return int(self.lengths.max())

    def binding(self, session: Any, T: int, rows: slice = slice(None)) -> Any:
        """An IO binding of `session` with each buffer (its `rows`) bound as the past and the
        present of a call with T tokens; the caller binds the other inputs and outputs."""
        if self.filled + T > self.max_len:
            raise GenerationError(f"cache: {self.filled} filled + {T} new positions exceed its "
                                  f"capacity {self.max_len}")
        if rows == slice(None) and self._io is not None:
            return self._io
        io = session.io_binding()
        for buf, name, out in zip(self.buffers, self.past, self.present):
            view = buf[rows]
            io.bind_input(name, "cpu", 0, self.dtype, list(view.shape), view.ctypes.data)
            io.bind_output(out, "cpu", 0, self.dtype, list(view.shape), view.ctypes.data)
        if rows == slice(None):
            self._io = io
        return io

    def advance(self, T: int) -> None:
        self.lengths += T


class StaticCache:
    def __init__(self, past: list[str], present: list[str], heads: list[int], head_dim: int,
                 dtype: np.dtype, batch: int, max_len: int) -> None:
        self.past, self.present, self.dtype = past, present, np.dtype(dtype)
        self.buffers = [np.zeros((batch, h, max_len, head_dim), self.dtype) for h in heads for _ in (0, 1)]
        self.new = [np.empty(batch * h * max_len * head_dim, self.dtype) for h in heads for _ in (0, 1)]
        self.pointers = [(b.__array_interface__["data"][0], n.__array_interface__["data"][0])
                         for b, n in zip(self.buffers, self.new)]
        self.max_len = max_len
        self.lengths = np.zeros(batch, np.int64)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def bind(self, io: Any, T: int) -> None:
        if int(self.lengths.max()) + T > self.max_len:
            raise GenerationError(f"cache: writing {T} positions after {int(self.lengths.max())} exceeds "
                                  f"the bundle's fixed KV length {self.max_len}")
        for i, (name, out) in enumerate(zip(self.past, self.present)):
            b, h, s, d = self.buffers[i].shape
            io.bind_input(name, "cpu", 0, self.dtype, [b, h, s, d], self.pointers[i][0])
            io.bind_output(out, "cpu", 0, self.dtype, [b, h, T, d], self.pointers[i][1])

    def advance(self, T: int, keep: int | None = None) -> None:
        """Write the first `keep` (default all T) new entries of each row at its positions."""
        keep = T if keep is None else keep
        rows = np.arange(self.batch_size)[:, None]
        pos = self.lengths[:, None] + np.arange(keep)
        for buf, new in zip(self.buffers, self.new):
            b, h, _, d = buf.shape
            fresh = new[: b * h * T * d].reshape(b, h, T, d)[:, :, :keep]
            buf[rows, :, pos] = fresh.transpose(0, 2, 1, 3)
        self.lengths += keep
