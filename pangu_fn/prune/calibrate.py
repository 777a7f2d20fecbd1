"""Calibration statistics from running the functional model on calibration tokens.

Input-channel norms of linears (Wanda, activation importance) are recorded by running the
unchanged `forward` on a tree whose chosen weights are wrapped in `InputNormRecorder`: a
stand-in weight leaf (the same duck type as a quantized weight, see `layers.linear`) that
computes the ordinary `F.linear` and adds the squared input of each channel to a sum. Taylor
importance takes gradients of the next-token loss over the params tree with `torch.func.grad`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..evaluate import next_token_loss
from ..model import forward
from ..params import Params
from ..tree import flatten, map_with_names


class InputNormRecorder:
    """Wraps a weight `[out, in]`; `linear(x, bias)` returns `F.linear(x, W, bias)` and adds
    `sum over tokens of x[..., j]^2` (float64) to `sq_sum[j]`. `embedding` serves a tied
    token embedding so the wrapped tree still runs."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.sq_sum = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        self.tokens = 0

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        self.sq_sum += flat.double().pow(2).sum(0)
        self.tokens += flat.shape[0]
        return F.linear(x, self.weight, bias)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


def calibration_windows(calib: Any, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Calibration tokens `[N, T]`: a 2-D tensor is used as given; a 1-D token stream (list or
    tensor) gives `samples` random windows of `seq_len` tokens (generator seeded by `seed`).
    Raises InputError when the stream is shorter than one window."""
    ids = torch.as_tensor(calib, dtype=torch.int64) if not isinstance(calib, torch.Tensor) else calib.long()
    if ids.dim() == 2:
        if ids.shape[1] < 2:
            raise InputError(f"calibration tokens: expected [N, T] with T >= 2, found {list(ids.shape)}")
        return ids
    if ids.dim() != 1 or ids.numel() < seq_len + 1:
        raise InputError(f"calibration tokens: expected a 1-D stream of at least {seq_len + 1} tokens "
                         f"(calib_seq_len + 1) or [N, T], found shape {list(ids.shape)}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def token_stream(calib: Any) -> torch.Tensor:
    """The calibration tokens as one 1-D stream (rows of a 2-D tensor are concatenated)."""
    ids = torch.as_tensor(calib, dtype=torch.int64) if not isinstance(calib, torch.Tensor) else calib.long()
    return ids.reshape(-1)


def _batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(tokens.split(batch_size))


@torch.inference_mode()
def input_norms(params: Params, cfg: ModelConfig, names: Sequence[str], tokens: torch.Tensor,
                batch_size: int = 8, progress: bool = False) -> dict[str, torch.Tensor]:
    """{weight name: ||X_j||_2 [in] (float32)}: the L2 norm of each input channel of the named
    linear weights over all calibration tokens `[N, T]` (every position counts)."""
    wanted = set(names)
    recorders: dict[str, InputNormRecorder] = {}

    def wrap(name: str, leaf: Any) -> Any:
        if name not in wanted:
            return leaf
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(f"prune: tensor {name} is already quantized ({type(leaf).__name__}); "
                              "prune before quantizing")
        recorders[name] = InputNormRecorder(leaf)
        return recorders[name]

    wrapped = map_with_names(wrap, params)
    missing = wanted - set(recorders)
    if missing:
        raise ConfigError(f"prune: no linear weights named {sorted(missing)[:3]} in the tree")
    device = params["tok_embed"]["weight"].device
    for batch in tqdm(_batches(tokens, batch_size), desc="calibrate", disable=not progress, dynamic_ncols=True):
        forward(wrapped, cfg, batch.to(device))
    unused = [n for n, r in recorders.items() if r.tokens == 0]
    if unused:
        raise ConfigError(f"prune: {unused[0]} is not used as a linear by the forward (e.g. an untied "
                          "input embedding); score it by magnitude instead")
    return {n: r.sq_sum.sqrt().float() for n, r in recorders.items()}


def loss_gradients(params: Params, cfg: ModelConfig, tokens: torch.Tensor, batch_size: int = 8,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """{dotted name: gradient (float32)} of the mean next-token loss over the calibration
    sequences `[N, T]` with respect to every tensor of the blocks (`blocks.*`, `query_layer.*`),
    computed with `torch.func.grad` over the params tree, batches weighted by their rows."""
    keys = ["blocks"] + (["query_layer"] if cfg.query_layer else [])
    device = params["tok_embed"]["weight"].device
    sub = {k: params[k] for k in keys}

    def loss(part: dict[str, Any], batch: torch.Tensor) -> torch.Tensor:
        return next_token_loss({**params, **part}, cfg, batch)

    grad_fn = torch.func.grad(loss)
    total: dict[str, torch.Tensor] = {}
    for batch in tqdm(_batches(tokens, batch_size), desc="gradients", disable=not progress, dynamic_ncols=True):
        weight = batch.shape[0] / tokens.shape[0]
        for name, g in flatten(grad_fn(sub, batch.to(device))).items():
            g = g.detach().float() * weight
            total[name] = total[name] + g if name in total else g
    return total
