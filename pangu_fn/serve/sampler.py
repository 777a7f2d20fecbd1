"""One running request's next token from its logits row: penalties, its own generator, logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..sampling import penalize, sample

if TYPE_CHECKING:
    from .engine import Running
    from .request import Request


def adjusted_logits(logits: torch.Tensor, req: Request, tokens: Sequence[int], vocab_size: int) -> torch.Tensor:
    """`logits [V]` (fp32) with the request's penalties applied after `tokens` (prompt +
    generated so far): presence and frequency penalties over the generated tokens, the
    repetition penalty over all of them. What the request samples from, before its filters."""
    generated = tokens[len(req.prompt):]
    if generated and (req.presence_penalty or req.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=vocab_size)[:logits.shape[0]]
        logits = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0)
    if req.sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, logits.shape[0], dtype=torch.bool, device=logits.device)
        seen[0, torch.tensor(tokens, device=logits.device)] = True
        logits = penalize(logits[None].float(), seen, req.sampling.repetition_penalty)[0]
    return logits


def token_logprobs(logits: torch.Tensor, token: int, req: Request) -> tuple[float | None, tuple[tuple[int, float], ...]]:
    """The log-probability of `token` under the model's distribution `logits [V]` (before
    penalties and filters) and the top alternatives, when the request asks for them."""
    if req.logprobs is None:
        return None, ()
    logp = torch.log_softmax(logits, -1)
    top = ()
    if req.logprobs:
        values, ids = torch.topk(logp, req.logprobs)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logp[token]), top


def sample_row(logits: torch.Tensor, r: Running, vocab_size: int) -> tuple[int, float | None, tuple[tuple[int, float], ...]]:
    """(token, its log-probability, the top alternatives) for `logits [V]` (fp32, the model's
    raw output): `adjusted_logits`, then the request's sampler drawing from its generator."""
    req = r.request
    token = int(sample(adjusted_logits(logits, req, r.tokens, vocab_size)[None], req.sampling, r.generator)[0])
    return (token, *token_logprobs(logits, token, req))
