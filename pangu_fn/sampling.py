"""SamplingParams and the logits -> token step: greedy, temperature, top-k, top-p,
repetition penalty. All randomness comes from an explicit `torch.Generator`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters;
    repetition_penalty > 1 discourages tokens already in the prompt or output (CTRL rule:
    positive logits are divided by it, negative ones multiplied)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InputError(f"SamplingParams: expected temperature >= 0, found {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"SamplingParams: expected an int top_k >= 0, found {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"SamplingParams: expected 0 < top_p <= 1, found {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"SamplingParams: expected repetition_penalty > 0, found {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of `logits [..., V]` over V (the first index among equal maxima), by `max`:
    2.5-3.5x faster than `argmax` on bf16 CPU logits."""
    return logits.max(-1).indices


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Apply the repetition penalty to `logits [B, V]` where `seen [B, V]` (bool) is set."""
    if seen is None or penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_logits(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on `logits [..., V]` (float32): tokens outside the
    support get -inf. Expects temperature > 0."""
    logits = logits.float() / sp.temperature
    vocab = logits.shape[-1]
    if 0 < sp.top_k < vocab:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= sp.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution a sampler draws from, `[..., V]` float32. Greedy gives a one-hot."""
    if sp.greedy:
        return torch.nn.functional.one_hot(greedy_tokens(logits), logits.shape[-1]).float()
    return filter_logits(logits, sp).softmax(-1)


def sample(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from `logits [B, V]` -> `[B]` int64."""
    logits = penalize(logits.float(), seen, sp.repetition_penalty)
    if sp.greedy:
        return greedy_tokens(logits)
    probs = filter_logits(logits, sp).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
