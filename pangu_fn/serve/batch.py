"""One forward call over some rows of an engine's KV cache, laid out so that in batch-invariant
mode each row computes the same way whatever else runs (see `engine`'s module docstring).

Row `PAD_ROWS + slot` of the cache belongs to slot `slot`; rows 0 and 1 are padding. The target
model's cache and a draft model's cache share this layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..config import ModelConfig
from ..model import forward
from ..params import Params

PAD_ROWS = 2
MIN_WIDTH = 4
MIN_ROWS = 12


@dataclass(frozen=True)
class Feed:
    """What one slot feeds: `tokens` written from position `start` (cut to the call's width),
    and `picks`, the indices into `tokens` whose logits the caller wants."""

    start: int
    tokens: tuple[int, ...]
    picks: tuple[int, ...]


def call_rows(params: Params, cfg: ModelConfig, cache: KVCache, feeds: Mapping[int, Feed],
              invariant: bool) -> tuple[dict[int, int], dict[int, torch.Tensor]]:
    """One `forward` over the slots of `feeds` (non-empty). All rows are padded to one width:
    the longest feed, cut so that every row's positions stay in the cache, and at least
    `MIN_WIDTH` when `invariant` (then at least `MIN_ROWS` rows, and padding row 0 keeps the key
    length at `max_len`). Returns, per slot, how many tokens were fed, and the fp32 logits
    `[P, V]` of its picks that were fed (P of them). Slots absent from `feeds` below the last
    one fed get junk written from position 0 of their rows. Donates `cache`'s buffers."""
    S = cache.max_len
    width = min(max(1, *(len(f.tokens) for f in feeds.values())), S - max(f.start for f in feeds.values()))
    last = PAD_ROWS + max(feeds) + 1
    if invariant:
        width = max(MIN_WIDTH, width)  # the callers keep every row MIN_WIDTH positions from the end
        first, rows = 0, max(last, MIN_ROWS)
    else:
        first, rows = PAD_ROWS, last
    fed = {slot: min(len(f.tokens), width) for slot, f in feeds.items()}
    picks = {slot: [p for p in f.picks if p < fed[slot]] for slot, f in feeds.items()}
    J = max(1, *(len(p) for p in picks.values()))
    tokens = torch.zeros(rows, width, dtype=torch.int64)
    lengths = torch.zeros(rows, dtype=torch.int64)
    index = torch.zeros(rows, J, dtype=torch.int64)
    lengths[0] = S - width  # keeps the key length at S (padding row 0; row 1 stays at 0)
    for slot, f in feeds.items():
        row, n = PAD_ROWS + slot, fed[slot]
        if n:
            tokens[row, :n] = torch.tensor(f.tokens[:n])
        lengths[row] = f.start
        p = picks[slot] or [max(n - 1, 0)]
        index[row] = torch.tensor(p + [p[-1]] * (J - len(p)))
    device = cache.lengths.device
    view = KVCache([k[first:rows] for k in cache.keys], [v[first:rows] for v in cache.values],
                   lengths[first:rows].to(device))
    index = index[first:rows, 0] if J == 1 else index[first:rows]  # one pick per row: the plain path
    with torch.inference_mode():
        logits, _ = forward(params, cfg, tokens[first:rows].to(device), view, logits_index=index.to(device))
        logits = logits.float()
    return fed, {slot: logits[PAD_ROWS + slot - first, :len(picks[slot])] for slot in feeds}
