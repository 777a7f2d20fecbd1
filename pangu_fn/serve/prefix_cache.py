"""A bounded store of prompt prefixes' keys and values (LRU), for reuse by later prompts.

Each entry is a prompt's token ids with copies of its positions' keys and values (one tensor
per cache layer, `[H_kv, n, D]`). A new prompt that shares a prefix with an entry copies those
positions into its cache row instead of recomputing them. `capacity` bounds the positions held
over all entries; the least recently used entries are dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..errors import InputError


@dataclass
class _Entry:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class PrefixCache:
    """`capacity` positions over all entries (0 turns it off); `min_match` the shortest shared
    prefix worth copying. Not thread-safe: the engine owns it."""

    def __init__(self, capacity: int, min_match: int = 1) -> None:
        if capacity < 0 or min_match < 1:
            raise InputError(f"PrefixCache: expected capacity >= 0 and min_match >= 1, found {capacity}, {min_match}")
        self.capacity, self.min_match = capacity, min_match
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.held = 0
        self.hits = 0
        self.hit_tokens = 0

    def match(self, prompt: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that length (at most
        len(prompt) - 1: the last prompt token is always computed, for its logits)."""
        best, best_n = None, 0
        limit = len(prompt) - 1
        for key in self.entries:
            n = _common_prefix(key, prompt, limit)
            if n > best_n:
                best, best_n = key, n
        return (best, best_n) if best_n >= self.min_match else (None, 0)

    def restore(self, key: tuple[int, ...], n: int, cache: KVCache, row: int) -> None:
        """Copy the first `n` positions of entry `key` into row `row` of `cache` (in place)."""
        entry = self.entries[key]
        self.entries.move_to_end(key)
        for buf, src in zip(cache.keys + cache.values, entry.keys + entry.values, strict=True):
            buf[row, :, :n] = src[:, :n]
        self.hits += 1
        self.hit_tokens += n

    def insert(self, prompt: Sequence[int], cache: KVCache, row: int) -> None:
        """Store copies of row `row`'s first len(prompt) positions under `prompt`; evicts the least
        recently used entries beyond capacity. A prompt longer than the capacity is not stored."""
        key, n = tuple(prompt), len(prompt)
        if n > self.capacity or n < self.min_match:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = _Entry([k[row, :, :n].clone() for k in cache.keys],
                                   [v[row, :, :n].clone() for v in cache.values])
        self.held += n
        while self.held > self.capacity:
            old, _ = self.entries.popitem(last=False)
            self.held -= len(old)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
