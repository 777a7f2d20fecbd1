"""`--tp N` for the commands: check the size, start N ranks, and give each its part of the model.

`pangu generate ... --tp N` checks N against the model's shapes and the devices before any
process starts, then runs the same command as N ranks (`python -m pangu_tools.tensor_parallel`,
the arguments passed as JSON in `PANGU_TP_ARGS`) and waits for them. A rank (started so, or by
torchrun: `torchrun --nproc-per-node N -m pangu_tools.cli generate ... --tp N`) joins the
group, loads only its slices (`load_shard`, for our folders; other layouts load whole, then
shard) and runs the command; only rank 0 writes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ARGS_ENV = "PANGU_TP_ARGS"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=_world_size, default=1, metavar="N",
                   help="tensor parallelism over N processes (gloo on CPU, nccl on CUDA, hccl on NPU)")


def _world_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1, found {text!r}")
    return int(text)


def is_rank() -> bool:
    """True inside a rank (started by `start` or by torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_lead() -> bool:
    """False only in a rank other than 0 (which leaves reporting to rank 0)."""
    return not is_rank() or os.environ["RANK"] == "0"


def start(args: argparse.Namespace, threads: int | None = None, env: dict[str, str] | None = None) -> int:
    """Check `args.tp` against the model and devices, then run `args.command` as that many ranks
    (`threads` CPU threads each, default the cores shared out; `env` added to theirs).
    Returns the exit code (the first failing rank's). Raises ConfigError before starting any
    process for a size the model or the devices cannot take."""
    from pangu_fn.distributed.launch import default_threads, run_processes

    check(args)
    threads = threads or default_threads(args.device, args.tp)
    env = {**(env or {}), ARGS_ENV: json.dumps({k: v for k, v in vars(args).items() if k != "func"})}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return run_processes([sys.executable, "-m", "pangu_tools.tensor_parallel"], args.tp, env)


def check(args: argparse.Namespace) -> None:
    import torch

    import pangu_fn as pf
    from pangu_fn.distributed.plan import check_world
    from pangu_fn.errors import ConfigError

    device = pf.select_device(args.device)
    count = {"cuda": torch.cuda.device_count, "npu": lambda: torch.npu.device_count()}.get(device.type)  # type: ignore[attr-defined]
    if count is not None and args.tp > count():
        raise ConfigError(f"--tp {args.tp}: expected at most the {count()} {device.type} devices here")
    shapes, cfg = model_shapes(args.model)
    check_world(shapes, cfg, args.tp)


def model_shapes(spec: str) -> tuple[dict[str, tuple[int, ...]], Any]:
    """Logical parameter shapes and config of a preset or a checkpoint, without reading weights
    (layouts that store no shapes apart from the tensors, e.g. .pt, are read)."""
    import pangu_fn as pf
    from pangu_fn.io.checkpoint import open_source
    from pangu_fn.tree import flatten

    if not Path(spec).exists() and spec in pf.PRESETS:
        cfg = pf.ModelConfig.preset(spec)
        return {n: tuple(t.shape) for n, t in flatten(pf.init_params(cfg, device="meta")).items()}, cfg
    source = open_source(spec)
    shapes = {n: ref.shape for n, ref in source.tensors.items()}
    for leaf, desc in source.leaves.items():  # a quantized leaf: its stored tensors -> its logical shape
        shapes = {n: s for n, s in shapes.items() if not n.startswith(leaf + ".")}
        shapes[leaf] = tuple(desc["shape"])
    return shapes, source.cfg


def rank_model(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """Inside a rank: join the group and return (this rank's params, cfg, is_random), like
    `common.resolve_model`. Ranks other than 0 stop writing to stdout."""
    import pangu_fn as pf
    from pangu_fn.distributed import init, load_shard, shard
    from pangu_fn.distributed.group import local_device

    from .common import resolve_model

    device = local_device(pf.select_device(args.device))
    rank, world = init(device)
    if world != args.tp:
        from pangu_fn.errors import ConfigError

        raise ConfigError(f"--tp {args.tp}: started as {world} processes; pass --tp {world}")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the rank)
    if Path(args.model).exists():
        params, cfg = load_shard(args.model, rank, world, device, args.dtype)
        return params, cfg, False
    params, cfg, random = resolve_model(args.model, str(device), args.dtype, args.weights_seed)
    return shard(params, cfg, rank, world), cfg, random


def main() -> int:
    """A rank started by `start`: rebuild the arguments and run the command."""
    import importlib

    from pangu_fn.distributed import destroy
    from pangu_fn.distributed.launch import die_with_parent
    from pangu_fn.errors import PanguError

    die_with_parent()
    args = argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))
    command = importlib.import_module(f"pangu_tools.{args.command.replace('-', '_')}")
    try:
        return int(command.run(args) or 0)
    except PanguError as e:
        print(f"pangu {args.command} (rank {os.environ['RANK']}): error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()


if __name__ == "__main__":
    sys.exit(main())
