"""Acceptance rules: which drafted tokens a speculative step keeps, and the token after them.

Shapes: B rows, K drafted tokens per row (row b drafted `counts[b] <= K` valid ones), V vocab.
The target scored `[last, d1 .. dK]`, so its position i predicts the token after `d_i`
(position 0 the token after `last`).
"""

from __future__ import annotations

import torch

from ..sampling import greedy_tokens


def greedy_accept(target_logits: torch.Tensor, drafts: torch.Tensor,
                  counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-match acceptance at temperature 0.

    `target_logits [B, K+1, V]` (already penalized), `drafts [B, K]`, `counts [B]`. Returns
    `accepted [B]` (the leading drafts equal to the target's argmax) and `next_tokens [B]` (the
    target's argmax after them: a correction, or the bonus token when all were accepted).
    The kept tokens are exactly those plain greedy decoding would produce."""
    pred = greedy_tokens(target_logits)
    accepted = _leading(drafts == pred[:, :-1], counts)
    return accepted, pred.gather(1, accepted[:, None]).squeeze(1)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, drafts: torch.Tensor,
                     counts: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of Leviathan et al. / Chen et al., which leaves the target's distribution intact.

    `target_probs [B, K+1, V]` is p, `draft_probs [B, K, V]` is q (None for a deterministic
    drafter: q is one-hot on the draft). Draft `d_i` is accepted with probability
    `min(1, p_i(d_i) / q_i(d_i))`; at the first rejection the next token is drawn from
    `norm(max(0, p_i - q_i))`; when all `counts[b]` drafts are accepted it is drawn from
    `p_counts` (the bonus token). Returns `accepted [B]` and `next_tokens [B]`."""
    B, K = drafts.shape
    p_draft = target_probs[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = 1.0 if draft_probs is None else draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, K, generator=rng, device=drafts.device)
    accepted = _leading(u * q_draft < p_draft, counts)
    rows = torch.arange(B, device=drafts.device)
    p_next = target_probs[rows, accepted]
    rejected = (accepted < counts)[:, None]
    at = accepted.clamp(max=max(K - 1, 0))
    if draft_probs is None:
        q_next = torch.zeros_like(p_next).scatter_(1, drafts[rows, at][:, None], 1.0) if K else 0.0
    else:
        q_next = draft_probs[rows, at]
    residual = torch.where(rejected, (p_next - q_next).clamp_min(0), p_next)
    # p == q exactly leaves no residual mass, but then the draft is always accepted; guard anyway
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return accepted, torch.multinomial(residual, 1, generator=rng).squeeze(-1)


def _leading(ok: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries of `ok [B, K]` are true, among the first `counts[b]`."""
    K = ok.shape[1]
    ok = ok & (torch.arange(K, device=ok.device) < counts[:, None])
    return ok.long().cumprod(1).sum(1)
