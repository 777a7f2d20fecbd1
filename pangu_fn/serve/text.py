"""Incremental detokenization with stop strings: which text a new token releases.

Text is the decode of all generated tokens so far. What may be shown is held back while it
ends in an unfinished UTF-8 character (U+FFFD) or in a prefix of a stop string; a stop string
found anywhere in the text (also one split across tokens) ends the text just before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Detokenize = Callable[[Sequence[int]], str]


def ids_text(ids: Sequence[int]) -> str:
    """The text of a model without a tokenizer: each token id as " <id>"."""
    return "".join(f" {i}" for i in ids)


@dataclass(frozen=True)
class TextState:
    """`shown` characters of the decoded text have been released."""

    shown: int = 0


def release(text: str, state: TextState, stop: Sequence[str], final: bool) -> tuple[str, TextState, bool]:
    """(new text to release, new state, stopped) for the decoded text of all generated tokens.
    `final` releases everything still held (the request ends for another reason)."""
    search_from = max(0, state.shown - max((len(s) for s in stop), default=0))
    hits = [i for i in (text.find(s, search_from) for s in stop) if i >= 0]
    if hits:
        end = max(min(hits), state.shown)
        return text[state.shown:end], TextState(end), True
    if final:
        return text[state.shown:].rstrip("\ufffd"), TextState(len(text)), False
    safe = len(text.rstrip("\ufffd"))
    held = max((k for s in stop for k in range(1, min(len(s) - 1, safe) + 1)
                if text[safe - k:safe] == s[:k]), default=0)  # a tail that may begin a stop string
    safe -= held
    safe = max(safe, state.shown)
    return text[state.shown:safe], TextState(safe), False
