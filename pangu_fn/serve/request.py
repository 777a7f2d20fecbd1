"""What a client asks the engine for (Request) and what the engine answers (Event)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    """One sequence to generate. `prompt` token ids; `max_tokens` new tokens at most;
    `sampling` temperature / top-k / top-p / repetition penalty; `presence_penalty` and
    `frequency_penalty` subtract `presence * (count > 0) + frequency * count` from the logits
    of tokens already generated (OpenAI's rule); `seed` seeds the request's own generator (None:
    a seed drawn from the engine's); `stop` strings end the text before them (needs a
    detokenizer); `eos` token ids end it after them; `logprobs` None, or how many top
    alternatives to report beside each token's log-probability; `deadline` a `time.monotonic()`
    instant after which a still-waiting request is dropped."""

    id: str
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()  # noqa: RUF009 (frozen)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos: frozenset[int] = frozenset()
    logprobs: int | None = None
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise InputError(f"request {self.id}: the prompt is empty; expected at least one token")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise InputError(f"request {self.id}: expected max_tokens >= 1, found {self.max_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InputError(f"request {self.id}: expected {name} in [-2, 2], found {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InputError(f"request {self.id}: expected logprobs in [0, 20], found {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"request {self.id}: expected non-empty stop strings, found {self.stop!r}")


@dataclass(frozen=True)
class Event:
    """One step's news about request `id`: a new `token` (None when the request ends without
    one: cancelled, timed out) with the `text` it completes (text held back while it might
    begin a stop string or an unfinished UTF-8 character is released later), its `logprob`
    and `top_logprobs` ((token, logprob) pairs) when asked for, and on the last event the
    `finish_reason`: "stop" (eos or a stop string), "length", "cancelled" or "timeout".
    `prompt_tokens` / `cached_tokens` are set on a request's first event."""

    id: str
    token: int | None
    text: str = ""
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
