"""Shared test helpers: random models whose biases and norm weights are not the trivial
0 / 1 that initialisers (ours and transformers') use, so their code paths are exercised."""

from __future__ import annotations

import subprocess
import sys
import threading

import torch

import pangu_fn as pf
from pangu_fn.tree import map_with_names


def redraw_vectors(params: dict, seed: int = 0) -> dict:
    """A copy with every bias ~ N(0, 0.1), every norm weight ~ 1 + N(0, 0.1), and every matrix
    rescaled to std 1/sqrt(fan_in) (embeddings: std 1), so that each part of the network
    (attention, MLP, query layer, biases) moves the logits visibly."""
    gen = torch.Generator().manual_seed(seed)

    def redraw(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2:
            std = 1.0 if "embed" in name or "lm_head" in name else t.shape[1] ** -0.5
            return (t.float() * (std / t.float().std())).to(t.dtype)
        noise = 0.1 * torch.randn(t.shape, generator=gen).to(t.dtype)
        return 1 + noise if "norm" in name and name.endswith("weight") else noise

    return map_with_names(redraw, params)


def random_model(preset: str, seed: int = 0, **changes) -> tuple[dict, pf.ModelConfig]:
    """(params, cfg) of a preset with redrawn vectors and rescaled matrices (see redraw_vectors)."""
    cfg = pf.ModelConfig.preset(preset).replace(**changes) if changes else pf.ModelConfig.preset(preset)
    return redraw_vectors(pf.init_params(cfg, seed=seed), seed=seed + 100), cfg


def redraw_hf(model: torch.nn.Module, seed: int = 0) -> None:
    """In place: transformers zeroes biases and sets norm weights to 1; redraw them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = 0.1 * torch.randn(p.shape, generator=gen)
                p.copy_(1 + noise if ("norm" in name or "ln" in name) else noise)


FAMILIES = ["tiny-gpt", "tiny-alpha", "tiny-openpangu"]


def peak_rss_script(imports: str, body: str) -> str:
    """A script for a child process: runs `imports`, resets the kernel's peak-RSS mark, runs
    `body` (which sets a dict `result`) and prints `result` as JSON with the RSS before `body`
    ("base") and the peak during it ("peak"). The peak is VmHWM, reset by writing 5 to
    /proc/self/clear_refs (ru_maxrss cannot be used in a child: Linux folds the forking parent's
    peak into it across exec)."""
    lines = ["import json, sys", "import psutil", imports,
             "def hwm():",
             "    with open('/proc/self/status') as f:",
             "        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))",
             "with open('/proc/self/clear_refs', 'w') as f:",
             "    f.write('5')",
             "base = psutil.Process().memory_info().rss",
             "assert hwm() <= base + 2**20",
             body,
             "print(json.dumps({**result, 'base': base, 'peak': hwm()}))"]
    return "\n".join(lines)


def start_server(*args: str, launcher: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`pangu serve *args --port 0` in a new process (`python *launcher -m pangu_tools.cli ...`,
    e.g. launcher `("-m", "torch.distributed.run", ...)` for torchrun): (the process, its base
    URL from the ready line). Waits at most 120 s for that line; kills the process and fails
    otherwise."""
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "pangu_tools.cli", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(120, proc.kill)  # bound the wait for the ready line
    timer.start()
    line = proc.stdout.readline()
    timer.cancel()
    if "ready at" not in line:
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {proc.stderr.read()}")
    return proc, line.split("ready at ")[1].strip()
