"""Exact selection of the k lowest-scoring weights, for tensors of any size.

Scores are turned into int32 sort keys: 0 for a weight that is already zero (so earlier
pruning is kept and the count of zeros is exactly k), otherwise the float32 bit pattern of
the non-negative score plus one (for non-negative floats the bit pattern is monotone in the
value). The k-th smallest key over any number of tensors is found by a two-pass radix select
(`torch.bincount` over the top 16 bits, then the low 15 bits of the one bucket that holds it),
processed in chunks of 2^24 elements: no `torch.quantile` (capped at 2^24 elements) and no
concatenation of the whole model. Ties at the threshold are broken by position (tensor order,
then flat index), so exactly k entries are selected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError

# keys of one tensor: the tensor itself, or a function that makes it (recomputed on each pass,
# so a global selection never holds the keys of the whole model at once)
Keys = torch.Tensor | Callable[[], torch.Tensor]

CHUNK = 1 << 24
_HI_BITS, _LO_BITS = 16, 15


def sort_keys(score: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 keys of the same shape as `score` (non-negative), ordering weights by score with
    weights already zero first."""
    bits = score.detach().float().abs().contiguous().view(torch.int32) + 1
    return bits.masked_fill_(weight.detach() == 0, 0)


def _materialize(keys: Keys) -> torch.Tensor:
    return keys() if callable(keys) else keys


def _chunks(keys: Sequence[Keys]):
    for k in keys:
        yield from _materialize(k).reshape(-1).split(CHUNK)


def kth_smallest(keys: Sequence[Keys], k: int) -> tuple[int, int]:
    """(key value t of the k-th smallest key (1-based) over all tensors, number of keys < t)."""
    hi_hist = torch.zeros(1 << _HI_BITS, dtype=torch.int64)
    for c in _chunks(keys):
        hi_hist += torch.bincount(c >> _LO_BITS, minlength=1 << _HI_BITS).cpu()
    hi_cum = hi_hist.cumsum(0)
    hi = int(torch.searchsorted(hi_cum, k))
    below = int(hi_cum[hi - 1]) if hi else 0
    lo_hist = torch.zeros(1 << _LO_BITS, dtype=torch.int64)
    mask = (1 << _LO_BITS) - 1
    for c in _chunks(keys):
        inside = c[(c >> _LO_BITS) == hi]
        if inside.numel():
            lo_hist += torch.bincount(inside & mask, minlength=1 << _LO_BITS).cpu()
    lo_cum = lo_hist.cumsum(0)
    lo = int(torch.searchsorted(lo_cum, k - below))
    below += int(lo_cum[lo - 1]) if lo else 0
    return (hi << _LO_BITS) | lo, below


def smallest_k_masks(keys: Sequence[Keys], k: int, total: int | None = None) -> list[torch.Tensor]:
    """Boolean masks (True = prune) selecting exactly the `k` smallest keys over all tensors
    together (`total` elements; computed when not given); ties at the threshold go to the
    earliest positions."""
    total = sum(_materialize(t).numel() for t in keys) if total is None else total
    if not 0 <= k <= total:
        raise InputError(f"smallest_k_masks: expected k in [0, {total}] (the number of weights), found k={k}")
    if k == 0:
        return [torch.zeros_like(_materialize(t), dtype=torch.bool) for t in keys]
    threshold, below = kth_smallest(keys, k)
    take = k - below  # entries equal to the threshold still to select, in order
    masks = []
    for t in map(_materialize, keys):
        m = t < threshold
        if take:
            flat_eq = (t == threshold).reshape(-1)
            n_eq = int(flat_eq.count_nonzero())
            if n_eq <= take:
                m |= flat_eq.view(t.shape)
                take -= n_eq
            else:
                idx = flat_eq.nonzero().squeeze(1)[:take]
                m.view(-1)[idx] = True
                take = 0
        masks.append(m)
    return masks


def smallest_k_per_row(keys: torch.Tensor, k: int, rows_per_chunk: int = 4096) -> torch.Tensor:
    """Boolean mask of `keys [R, C]` selecting exactly the `k` smallest of every row (stable:
    ties go to the lower column)."""
    mask = torch.zeros_like(keys, dtype=torch.bool)
    if k == 0:
        return mask
    for start in range(0, keys.shape[0], rows_per_chunk):
        block = keys[start:start + rows_per_chunk]
        idx = torch.sort(block, dim=1, stable=True).indices[:, :k]
        mask[start:start + rows_per_chunk].scatter_(1, idx, True)
    return mask


def n_of_m_mask(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of `keys [R, C]` (C divisible by m) selecting the `n` smallest of every run
    of `m` consecutive columns."""
    rows, cols = keys.shape
    groups = keys.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
