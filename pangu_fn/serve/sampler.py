"""One running request's next token from its logits row: penalties, its own generator, logprobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..sampling import sample

if TYPE_CHECKING:
    from .engine import Running


def sample_row(logits: torch.Tensor, r: Running, vocab_size: int) -> tuple[int, float | None, tuple[tuple[int, float], ...]]:
    """(token, its log-probability, the top alternatives) for `logits [V]` (fp32, the model's
    raw output). Presence and frequency penalties apply to the tokens generated so far, the
    repetition penalty to prompt and generated tokens; the request's generator draws the sample.
    Log-probabilities are those of the model's distribution (before penalties and filters),
    reported when the request asks for them."""
    req = r.request
    adjusted = logits
    generated = r.generated
    if generated and (req.presence_penalty or req.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=vocab_size)[:logits.shape[0]]
        adjusted = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0)
    seen = None
    if req.sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, logits.shape[0], dtype=torch.bool, device=logits.device)
        seen[0, torch.tensor(r.tokens, device=logits.device)] = True
    token = int(sample(adjusted[None], req.sampling, r.generator, seen)[0])
    if req.logprobs is None:
        return token, None, ()
    logp = torch.log_softmax(logits, -1)
    top = ()
    if req.logprobs:
        values, ids = torch.topk(logp, req.logprobs)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return token, float(logp[token]), top
