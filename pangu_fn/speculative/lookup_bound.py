"""How far prompt lookup can go on a known greedy continuation.

Greedy speculative decoding keeps exactly the target's greedy tokens, so a lookup drafter's
tokens per target call can be replayed from those tokens alone, without a model. Replaying
`PromptLookup`'s own choice reproduces a benchmark's measured figure; replaying the best of all
its n-gram matches at every step bounds what any rule choosing among them (or a tree verifying
all of them at once) could reach. A low bound means the target does not repeat its context:
no lookup rule can help it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError


def lookup_replay(prompt: Sequence[int], continuation: Sequence[int], k: int, max_ngram: int = 3,
                  min_ngram: int = 1, best_of_all: bool = False) -> tuple[int, int]:
    """Replay greedy speculative decoding of `continuation` (the target's greedy tokens after
    `prompt`; the first comes from the prefill, as in `spec_init`) with drafts of `k` tokens
    copied after earlier occurrences of the context's last n tokens (n from `max_ngram` down to
    `min_ngram`), continued with the repeat's period when the match is within `k` of the end.

    `best_of_all=False` takes `PromptLookup`'s draft (the longest n that occurs, its latest
    occurrence); `True` takes, at every step, the draft among all occurrences of every n that
    the target accepts furthest (an oracle). A step without a match decodes one token.
    Returns (target calls, tokens those calls kept). Raises InputError for k < 1 or n-gram
    bounds outside 1 <= min_ngram <= max_ngram."""
    if k < 1 or not 1 <= min_ngram <= max_ngram:
        raise InputError(f"lookup_replay: expected k >= 1 and 1 <= min_ngram <= max_ngram, found k={k}, "
                         f"min_ngram={min_ngram}, max_ngram={max_ngram}")
    context, todo = list(prompt) + list(continuation[:1]), list(continuation[1:])
    calls = kept = 0
    while todo:
        drafts = _matches(context, k, max_ngram, min_ngram)
        if not best_of_all:
            drafts = drafts[:1]
        room = min(k, len(todo) - 1)  # never draft past the last token (spec_step's counts)
        accepted = max((_leading_equal(d[:room], todo) for d in drafts), default=0)
        step = accepted + 1
        context += todo[:step]
        todo = todo[step:]
        calls, kept = calls + 1, kept + step
    return calls, kept


def _matches(context: list[int], k: int, max_ngram: int, min_ngram: int) -> list[list[int]]:
    """The drafts of every occurrence of the context's last n tokens, longest n first, latest
    occurrence first (so the first is PromptLookup's)."""
    drafts = []
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        for end in range(len(context) - 1, n - 1, -1):  # the match ends before `end`
            if context[end - n:end] == suffix:
                period = len(context) - end
                drafts.append([context[end + i % period] for i in range(k)])
    return drafts


def _leading_equal(draft: list[int], truth: list[int]) -> int:
    count = 0
    for d, t in zip(draft, truth):
        if d != t:
            break
        count += 1
    return count
