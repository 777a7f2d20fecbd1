"""Prompt-lookup drafting: propose the tokens that followed the most recent earlier
occurrence of the sequence's last n-gram (n from `max_ngram` down to `min_ngram`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import GenerationError


@dataclass(frozen=True)
class PromptLookup:
    """Draft up to `num_draft` tokens per step by n-gram match against the row's own
    history (prompt and generated tokens)."""

    num_draft: int = 5
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not (self.num_draft >= 1 and 1 <= self.min_ngram <= self.max_ngram):
            raise GenerationError(f"PromptLookup: expected num_draft >= 1 and 1 <= min_ngram <= max_ngram, "
                                  f"found {self}")


def draft_tokens(history: list[int], lookup: PromptLookup) -> list[int]:
    """Up to `lookup.num_draft` tokens continuing `history`, or [] when no n-gram recurs."""
    ids = np.asarray(history, np.int64)
    for n in range(min(lookup.max_ngram, len(ids) - 1), lookup.min_ngram - 1, -1):
        windows = sliding_window_view(ids[:-1], n)  # every earlier n-gram (not the tail itself)
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start: start + lookup.num_draft].tolist()
    return []
