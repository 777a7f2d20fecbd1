"""shard(params, cfg, rank, world_size) -> params: one rank's part of a tree, as a tree.

Column-parallel parts are plain (smaller) tensors or quantized leaves: the model reads the
rank's head counts and FFN width from their shapes, as it does for pruned models. Row-parallel
weights and the vocab-parallel embedding / LM head become leaves that bring their collective
(`leaves.py`). The sharding rules are in `plan.py`.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from ..params import Params, decode_layout
from ..tree import flatten, unflatten
from .leaves import RowParallel, VocabParallel, _Parallel
from .plan import REPLICATE, Split, split_plan
from .slicing import take


def shard(params: Params, cfg: ModelConfig, rank: int, world_size: int, group: Any = None) -> Params:
    """A new tree holding rank `rank`'s part of `params` for tensor parallelism over
    `world_size` ranks (Megatron-style, see `plan.py`); the input is untouched and its
    leaves may be float tensors or quantized leaves (int8, int4: a row split must keep whole
    groups). `group` is the process group the collectives run over (default: the default
    group, looked up when they run, so sharding itself needs no group). `world_size` 1
    returns the tree as it is. Raises ConfigError for a world size that does not divide every
    block's query heads and FFN width (naming the valid sizes), a bad rank, an int4 group a
    row split would cut, or a tree that is already sharded."""
    flat = flatten(params)
    sharded = [n for n, leaf in flat.items() if isinstance(leaf, _Parallel)]
    if sharded:
        raise ConfigError(f"shard: expected an unsharded tree, found {sharded[0]} already sharded")
    if world_size == 1 and rank == 0:
        return params
    plan = split_plan({n: tuple(leaf.shape) for n, leaf in flat.items()}, cfg, rank, world_size)
    parts = {name: take(leaf, plan.get(name, REPLICATE), name) for name, leaf in flat.items()}
    return wrap(decode_layout(unflatten(parts)), plan, cfg, group)


def wrap(local: Params, plan: dict[str, Split], cfg: ModelConfig, group: Any = None) -> Params:
    """A tree of cut parts -> the sharded tree: row-parallel weights and vocab-parallel tables
    become the leaves that bring their collective."""
    flat = flatten(local)
    for name, split in plan.items():
        if split.how == "row":
            flat[name] = RowParallel(flat[name], group)
        elif split.how == "vocab":
            (lo, hi), = split.ranges
            flat[name] = VocabParallel(flat[name], lo, hi - lo, cfg.vocab_size, group)
    return unflatten(flat)
