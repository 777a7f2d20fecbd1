"""Tensor parallelism on torch.distributed: sharding as a tree transform, collectives as leaves.

    rank, world = pf.distributed.init()               # under torchrun, or inside `launch`
    params = pf.shard(params, cfg, rank, world)       # this rank's part
    pf.generate(params, cfg, prompts, 32)             # every rank runs the same call

`shard` cuts each rank's part (Megatron-style rules in `plan.py`); row-parallel weights and
the vocab-parallel embedding / head are leaves whose kernels end in an all-reduce or an
all-gather (`leaves.py`). `load_shard` reads only a rank's slices from a checkpoint; `launch`
starts N local worker processes. Backends: gloo (CPU), nccl (CUDA), hccl (Ascend).
"""

from .group import backend_for, destroy, init, rank_and_world
from .launch import RankFailed, launch
from .leaves import RowParallel, VocabParallel
from .load import load_shard
from .plan import Split, split_plan, valid_world_sizes
from .shard import shard

__all__ = ["RankFailed", "RowParallel", "Split", "VocabParallel", "backend_for", "destroy", "init", "launch",
           "load_shard", "rank_and_world", "shard", "split_plan", "valid_world_sizes"]
