"""Calibration statistics for GPTQ, collected by running the functional model itself.

Each linear being calibrated is replaced, for the duration of the run, by a recording leaf:
`layers.linear` calls its `linear(x, bias)`, which adds `x^T x` of the layer's input to that
layer's Hessian and returns the plain float result. No second model definition is involved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import InputError
from ..model import forward
from ..params import Params, astype
from ..tree import flatten, unflatten

DEFAULT_HESSIAN_BYTES = 2 * 1024**3  # Hessians held at once; more linears take more passes


class _Recorder:
    """A float weight `[N, K]` that accumulates the Hessian `sum x x^T` `[K, K]` of its inputs.
    Recorders of one pass share `last`: linears fed the same input tensor (q, k, v; gate, up)
    reuse the product computed for the first of them."""

    def __init__(self, weight: torch.Tensor, last: dict) -> None:
        self.weight, self.shape, self.last = weight, weight.shape, last
        self.hessian = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32, device=weight.device)
        self.rows = 0

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.last.get("x") is not x:
            rows = x.reshape(-1, x.shape[-1]).float()
            self.last.update(x=x, xtx=rows.t() @ rows, rows=rows.shape[0])
        self.hessian += self.last["xtx"]
        self.rows += self.last["rows"]
        return F.linear(x, self.weight, bias)


def calibration_windows(ids: Sequence[int] | torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens `[count, seq_len]`, evenly spaced over the stream
    `ids` (fewer when the stream is short). Raises InputError for a stream under one window."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if ids.numel() < seq_len or seq_len < 2 or count < 1:
        raise InputError(f"calibration: expected at least one window of {seq_len} (>= 2) tokens, "
                         f"found a stream of {ids.numel()} tokens and count {count}")
    starts = torch.linspace(0, ids.numel() - seq_len, min(count, ids.numel() // seq_len)).long()
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.inference_mode()
def collect_hessians(params: Params, cfg: ModelConfig, windows: torch.Tensor, names: Sequence[str],
                     batch_size: int = 4, max_bytes: int = DEFAULT_HESSIAN_BYTES,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """`{name: H [K, K]}` (mean of `x x^T` over calibration tokens) for the linears `names`
    (dotted paths without `.weight`), from fp32 forward passes over `windows [B, T]`.
    Linears are recorded in groups whose Hessians fit in `max_bytes`, one pass per group."""
    float_params = astype(params, torch.float32)
    flat = flatten(float_params)
    windows = windows.to(flat["tok_embed.weight"].device)
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        k = flat[f"{name}.weight"].shape[1]
        if groups[-1] and used + 4 * k * k > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += 4 * k * k
    out: dict[str, torch.Tensor] = {}
    steps = len(groups) * ((len(windows) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="calibrate", disable=not progress, dynamic_ncols=True)
    for group in groups:
        last: dict = {}
        recorders = {name: _Recorder(flat[f"{name}.weight"], last) for name in group}
        tree = unflatten({**flat, **{f"{n}.weight": r for n, r in recorders.items()}})
        for i in range(0, len(windows), batch_size):
            forward(tree, cfg, windows[i:i + batch_size])
            last.clear()
            bar.update()
        for name, rec in recorders.items():
            out[name] = rec.hessian / max(rec.rows, 1)
    bar.close()
    return out
