"""The process group: which backend speaks to the device, and joining or leaving the group.

Ranks find each other the way torchrun tells them to (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
`MASTER_PORT`, `LOCAL_RANK` in the environment), whether torchrun or `launch` started them.
Every group gets a timeout, so a rank that stops answering makes the others fail instead of
waiting forever.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..device import npu_available
from ..errors import ConfigError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
DEFAULT_TIMEOUT_S = 30.0


def device_type(device: str | torch.device) -> str:
    """"cpu", "cuda", "npu", ...: read from the name (torch.device("npu") parses only once
    torch_npu is imported)."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def backend_for(device: str | torch.device) -> str:
    """The collective backend of a device type: gloo (CPU), nccl (CUDA), hccl (Ascend NPU).
    Raises ConfigError for other devices."""
    kind = device_type(device)
    if kind not in BACKENDS:
        raise ConfigError(f"tensor parallelism: no collective backend for device {kind!r}; "
                          f"expected one of {sorted(BACKENDS)}")
    return BACKENDS[kind]


def local_device(device: str | torch.device) -> torch.device:
    """`device` with this process's index (`LOCAL_RANK`) for CUDA / NPU; the CPU as it is."""
    dev = torch.device(device)
    if dev.type == "cpu" or dev.index is not None:
        return dev
    return torch.device(dev.type, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the default process group described by the environment (torchrun's variables)
    with the backend of `device`; returns `(rank, world_size)`. Already joined: returns them.
    Collectives that wait longer than `timeout_s` raise (so a dead peer never hangs a rank).
    Raises ConfigError when the environment names no rank or world size."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"distributed.init: expected torchrun's environment variables, missing {missing}; "
                          "start the processes with torchrun or pangu_fn.distributed.launch")
    dev = local_device(device)
    if dev.type == "npu" and not npu_available():  # importing torch_npu registers hccl
        raise ConfigError("distributed.init: device npu needs torch_npu and an Ascend device; found neither")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend_for(dev), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def destroy() -> None:
    """Leave the default process group (no-op when not joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default group, or (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
