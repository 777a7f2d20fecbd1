"""Next-token loss and perplexity of a params tree on token streams."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import ModelConfig
from .model import forward
from .params import Params


def next_token_loss(params: Params, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting `tokens[:, 1:]` from `tokens[:, :-1]`; tokens `[B, T]`.
    Differentiable in the params (no cache is used)."""
    logits, _ = forward(params, cfg, tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def windows(ids: Sequence[int], seq_len: int) -> Iterable[list[int]]:
    """Non-overlapping windows of `seq_len + 1` tokens (each scores `seq_len` predictions);
    a shorter tail window is kept if it has at least two tokens."""
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        chunk = list(ids[start:start + seq_len + 1])
        if len(chunk) >= 2:
            yield chunk


@torch.inference_mode()
def perplexity(params: Params, cfg: ModelConfig, ids: Sequence[int], seq_len: int | None = None,
               batch_size: int = 8, progress: bool = False, desc: str = "perplexity") -> float:
    """exp(mean next-token loss) over `ids` cut into windows of `seq_len` (default: the
    context length, capped at 256) predictions; every token after a window's first counts once.
    `progress` shows a tqdm bar (stderr) over the batches."""
    seq_len = min(seq_len or cfg.max_seq_len, cfg.max_seq_len - 1, 256 if seq_len is None else seq_len)
    device = params["tok_embed"]["weight"].device
    total, count = 0.0, 0
    chunks = list(windows(ids, seq_len))
    for i in tqdm(range(0, len(chunks), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        group = chunks[i:i + batch_size]
        by_len: dict[int, list[list[int]]] = {}
        for c in group:
            by_len.setdefault(len(c), []).append(c)
        for n, rows in by_len.items():
            t = torch.tensor(rows, device=device)
            loss = next_token_loss(params, cfg, t)
            total += loss.item() * (n - 1) * len(rows)
            count += (n - 1) * len(rows)
    return math.exp(total / count)


@torch.inference_mode()
def greedy_agreement(params_a: Params, cfg_a: ModelConfig, params_b: Params, cfg_b: ModelConfig,
                     ids: Sequence[int], seq_len: int = 256, batch_size: int = 8) -> float:
    """Fraction of positions of `ids` (windows of `seq_len` tokens, no cache) where the two
    models' argmax next tokens agree: e.g. how often a draft model's greedy guess is the
    target's. The models must share a vocabulary."""
    device = params_a["tok_embed"]["weight"].device
    same, count = 0, 0
    chunks = [c[:-1] for c in windows(ids, seq_len)]
    for i in range(0, len(chunks), batch_size):
        for n in sorted({len(c) for c in chunks[i:i + batch_size]}):
            t = torch.tensor([c for c in chunks[i:i + batch_size] if len(c) == n], device=device)
            a = forward(params_a, cfg_a, t)[0].argmax(-1)
            b = forward(params_b, cfg_b, t.to(params_b["tok_embed"]["weight"].device))[0].argmax(-1)
            same += int((a == b.to(a.device)).sum())
            count += a.numel()
    return same / count
