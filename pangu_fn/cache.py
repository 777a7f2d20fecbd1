"""KVCache: the decoding state as an explicit value.

Per block, static buffers `keys[i]`, `values[i]` of shape `[B, H_kv_i, S_max, D]`, plus
per-row `lengths [B]` (int64): row b holds valid entries at positions `0 .. lengths[b]-1`.
Entries past a row's length are stale and never attended to (the causal mask compares
positions), so rolling a row back is setting its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from .config import ModelConfig
from .errors import InputError
from .params import Params, layer_sizes


@dataclass(frozen=True)
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """S_max: the number of positions each buffer can hold."""
        return self.keys[0].shape[2]

    def with_lengths(self, lengths: torch.Tensor | list[int]) -> KVCache:
        """The same buffers with new per-row lengths (rollback or ragged-prefill fix-up).
        Shares (does not copy) the buffers."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=self.lengths.device)
        if lengths.shape != self.lengths.shape:
            raise InputError(f"KVCache.with_lengths: expected {tuple(self.lengths.shape)} lengths, "
                             f"found {tuple(lengths.shape)}")
        return KVCache(self.keys, self.values, lengths)

    def rollback(self, n: torch.Tensor | list[int]) -> KVCache:
        """Drop the last `n[b]` positions of each row (by length only; buffers are shared)."""
        n = torch.as_tensor(n, dtype=torch.int64, device=self.lengths.device)
        return self.with_lengths(self.lengths - n)

    def select_rows(self, rows: torch.Tensor | list[int]) -> KVCache:
        """A cache holding copies of only the given rows (for dropping finished rows)."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.lengths.device)
        return KVCache([k[idx] for k in self.keys], [v[idx] for v in self.values], self.lengths[idx])

    def clone(self) -> KVCache:
        return KVCache([k.clone() for k in self.keys], [v.clone() for v in self.values],
                       self.lengths.clone())


pytree.register_dataclass(KVCache)


def init_cache(params: Params, cfg: ModelConfig, batch_size: int, max_len: int,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
    """Zeroed buffers for `batch_size` rows of up to `max_len` positions, lengths 0.

    KV head counts come from each block's parameter shapes; dtype and device default to
    those of the token embedding (the compute dtype)."""
    if max_len < 1 or batch_size < 1:
        raise InputError(f"init_cache: expected batch_size >= 1 and max_len >= 1, "
                         f"found {batch_size} and {max_len}")
    ref = params["tok_embed"]["weight"]
    dtype = dtype or compute_dtype(params)
    device = device or ref.device
    blocks = list(params["blocks"]) + ([params["query_layer"]] if cfg.query_layer else [])
    shapes = [(batch_size, layer_sizes(b, cfg).num_kv_heads, max_len, cfg.head_dim) for b in blocks]
    return KVCache(
        keys=[torch.zeros(s, dtype=dtype, device=device) for s in shapes],
        values=[torch.zeros(s, dtype=dtype, device=device) for s in shapes],
        lengths=torch.zeros(batch_size, dtype=torch.int64, device=device),
    )


def compute_dtype(params: Params) -> torch.dtype:
    """The dtype activations run in: that of the token embedding (a float tensor, or the
    `compute_dtype` a quantized embedding declares)."""
    w = params["tok_embed"]["weight"]
    return w.dtype if isinstance(w, torch.Tensor) else w.compute_dtype
