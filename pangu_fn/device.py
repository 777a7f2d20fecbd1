"""Device choice and device facts: Ascend NPU (when torch_npu imports) -> CUDA -> CPU.

A missing torch_npu costs one `find_spec` lookup and prints nothing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import resource
from typing import Any

import torch

from .errors import ConfigError


@functools.cache
def npu_available() -> bool:
    """True when torch_npu is installed, imports, and sees a device."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  (a broken CANN install must not break CPU users)
        return False


def select_device(prefer: str | torch.device | None = None) -> torch.device:
    """`prefer` if given ("cpu", "cuda:0", "npu"), else the first available of NPU, CUDA, CPU.
    Raises ConfigError for a device that is not available."""
    if prefer is None or str(prefer) == "auto":
        if npu_available():
            return torch.device("npu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(prefer)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {prefer!r}: {e}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "npu": npu_available()}
    if not available.get(dev.type, False):
        raise ConfigError(f"device {prefer!r} is not available here; expected one of "
                          f"{[k for k, ok in available.items() if ok]}")
    return dev


def _backend(device: torch.device) -> Any:
    return getattr(torch, device.type, None)


def device_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Type, index, name, total and free memory (bytes; None where unknown), CPU threads."""
    dev = select_device(device)
    info: dict[str, Any] = {"type": dev.type, "index": dev.index, "threads": torch.get_num_threads()}
    if dev.type == "cpu":
        info["name"] = _cpu_name()
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["total_memory"] = pages * page_size
        info["free_memory"] = os.sysconf("SC_AVPHYS_PAGES") * page_size
    else:
        backend = _backend(dev)
        idx = dev.index or 0
        info["name"] = backend.get_device_name(idx)
        free, total = backend.mem_get_info(idx)
        info["total_memory"], info["free_memory"] = total, free
    return info


def memory_stats(device: str | torch.device | None = None) -> dict[str, int]:
    """Bytes in use and peak: allocator counters on accelerators, RSS on the CPU."""
    dev = select_device(device)
    if dev.type == "cpu":
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss": rss, "peak_rss": max(peak, rss)}  # ru_maxrss can lag the current RSS
    backend = _backend(dev)
    return {"allocated": backend.memory_allocated(dev), "reserved": backend.memory_reserved(dev),
            "peak_allocated": backend.max_memory_allocated(dev)}


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued work on the device (a no-op on the CPU)."""
    dev = select_device(device)
    if dev.type != "cpu":
        _backend(dev).synchronize()


def empty_cache(device: str | torch.device | None = None) -> None:
    """Return cached allocator memory to the device (a no-op on the CPU)."""
    dev = select_device(device)
    if dev.type != "cpu":
        _backend(dev).empty_cache()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
