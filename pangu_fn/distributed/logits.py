"""Vocab-parallel logits that are gathered only when something needs the whole vocabulary.

The vocab-parallel LM head returns, in eager mode, a `ShardedLogits`: a tensor of the full
shape `[..., V]` that holds only this rank's columns. Selecting rows or positions and casting
stay local; the maximum over the vocabulary (greedy decoding: `sampling.greedy_tokens`) is a
local top-1 followed by an all-gather of one (value, index) pair per row, so greedy decoding
never moves the vocabulary. Any other op gathers the columns of every rank first and runs on
the full tensor (sampling, printing, comparisons). In-place ops raise: the columns of the
other ranks are not here to change. Traced code (torch.compile / export) gets plain gathered
logits from the head instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from .leaves import all_gather_last

aten = torch.ops.aten
LOCAL_UNARY = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.detach.default, aten.alias.default}


class ShardedLogits(torch.Tensor):
    """Logits `[..., V]` of which this rank holds columns `start .. start + rows - 1` as
    `local [..., C]` (C >= rows; columns past `rows` are padding)."""

    local: torch.Tensor

    @staticmethod
    def __new__(cls, local: torch.Tensor, start: int, rows: int, vocab_size: int, group: Any) -> Any:
        shape = (*local.shape[:-1], vocab_size)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=local.dtype, device=local.device)

    def __init__(self, local: torch.Tensor, start: int, rows: int, vocab_size: int, group: Any) -> None:
        self.local, self.start, self.rows, self.vocab_size, self.group = local, start, rows, vocab_size, group

    def __repr__(self) -> str:  # type: ignore[override]
        return f"ShardedLogits({self.full()!r})"

    def full(self) -> torch.Tensor:
        """The whole `[..., V]`, gathered from every rank (a collective: every rank calls it)."""
        return all_gather_last(self.local, self.group)[..., : self.vocab_size]

    def _like(self, local: torch.Tensor) -> ShardedLogits:
        return ShardedLogits(local, self.start, self.rows, self.vocab_size, self.group)

    def max_over_vocab(self, keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the maximum over V: the first index among equal maxima, as
        `torch.max` gives (ranks hold increasing ids, so the lowest rank wins a tie)."""
        if self.rows:
            values, indices = self.local[..., : self.rows].max(-1)
        else:  # a tiny vocabulary can leave the last rank only padding
            values = self.local.new_full(self.local.shape[:-1], float("-inf"))
            indices = torch.zeros(self.local.shape[:-1], dtype=torch.long, device=self.local.device)
        pairs = all_gather_last(torch.stack([values.float(), (indices + self.start).float()], -1), self.group)
        pairs = pairs.unflatten(-1, (-1, 2))  # [..., world, 2]
        best = pairs[..., 0].max(-1, keepdim=True).indices  # first rank holding the maximum
        values = pairs[..., 0].gather(-1, best).to(self.dtype)
        indices = pairs[..., 1].gather(-1, best).long()
        return (values, indices) if keepdim else (values.squeeze(-1), indices.squeeze(-1))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self = args[0]
        if isinstance(self, ShardedLogits):
            last = self.dim() - 1
            if func is aten.max.dim and args[1] % self.dim() == last:
                return self.max_over_vocab(bool(args[2]) if len(args) > 2 else kwargs.get("keepdim", False))
            if func in (aten.select.int, aten.slice.Tensor) and args[1] % self.dim() != last:
                return self._like(func(self.local, *args[1:], **kwargs))
            if func is aten.index.Tensor and len(args[1]) < self.dim():  # leading dims only
                return self._like(func(self.local, *args[1:], **kwargs))
            if func in LOCAL_UNARY:
                return self._like(func(self.local, *args[1:], **kwargs))
        if func._schema.is_mutable:
            raise NotImplementedError(f"ShardedLogits: in-place {func} would change only this rank's columns; "
                                      "take a copy first (logits.clone() gathers them)")

        def whole(t: Any) -> Any:
            return t.full() if isinstance(t, ShardedLogits) else t

        return func(*pytree.tree_map(whole, args), **pytree.tree_map(whole, kwargs))
