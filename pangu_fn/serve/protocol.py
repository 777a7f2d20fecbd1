"""OpenAI request bodies -> engine Requests: the fields each endpoint accepts, their checks,
and the API's error shape. Every field is checked; an unknown one is a 400 naming it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..sampling import SamplingParams
from .request import Request

COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
          "presence_penalty", "frequency_penalty", "seed", "stop", "n", "stream", "stream_options", "user"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs"}
MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    """An HTTP error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """What one HTTP request asks for: `prompts` (token ids, with their text when known), `n`
    choices each, the request template every choice copies (`max_tokens`, sampling, stops,
    logprobs), `seed` (choice k uses seed + k), `stream` / `include_usage`, `echo`."""

    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str | None, ...]
    n: int
    max_tokens: int
    sampling: SamplingParams
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None
    stream: bool
    include_usage: bool
    echo: bool = False

    def requests(self, base_id: str, eos: frozenset[int], deadline: float | None) -> list[Request]:
        """One engine Request per choice, choice k = prompt index * n + j."""
        out = []
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                k = i * self.n + j
                out.append(Request(f"{base_id}-{k}", prompt, self.max_tokens, self.sampling, self.presence_penalty,
                                   self.frequency_penalty, None if self.seed is None else self.seed + k, self.stop,
                                   eos, self.logprobs, deadline))
        return out


def check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, f"expected a JSON object as the request body, found {type(body).__name__}")
    for key in body:
        if key not in allowed:
            raise APIError(400, f"unsupported field {key!r}; this server accepts {sorted(allowed)}", param=key,
                           code="unsupported_field")
    return body


def number(body: dict, name: str, default: float | None, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name}: expected {kind} in [{lo}, {hi}], found {v!r}", param=name)
    return v


def flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool):
        raise APIError(400, f"{name}: expected true or false, found {v!r}", param=name)
    return v


def parse_job(body: dict, prompts: Sequence[tuple[int, ...]], texts: Sequence[str | None], limit: int,
              chat: bool, has_tokenizer: bool) -> Job:
    """The common fields of both endpoints. `limit` positions a request may use."""
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    longest = max(len(p) for p in prompts)
    max_tokens = number(body, name, None, 1, 10**9, integer=True)
    if max_tokens is None:
        max_tokens = limit - longest if chat else 16
    if longest + max_tokens > limit:
        raise APIError(400, f"this model's context holds {limit} tokens; the prompt has {longest} tokens and "
                            f"{name} is {max_tokens} ({longest + max_tokens} in all)", param=name,
                       code="context_length_exceeded")
    if max_tokens < 1:
        raise APIError(400, f"the prompt has {longest} tokens and leaves no room to generate in the "
                            f"{limit}-token context", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop: expected a non-empty string or a list of up to {MAX_STOP}, found {body['stop']!r}",
                       param="stop")
    if stop and not has_tokenizer:
        raise APIError(400, "stop: this model has no tokenizer, so there is no text to stop on", param="stop")
    options = body.get("stream_options")
    stream = flag(body, "stream")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "stream_options: expected {\"include_usage\": bool} with stream true, "
                            f"found {options!r}", param="stream_options")
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "top_p: expected a number in (0, 1], found 0", param="top_p")
    sampling = SamplingParams(number(body, "temperature", 1.0, 0.0, 2.0), number(body, "top_k", 0, 0, 10**6, True),
                              top_p, number(body, "repetition_penalty", 1.0, 0.01, 10.0))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, f"user: expected a string, found {user!r}", param="user")
    return Job(tuple(prompts), tuple(texts), number(body, "n", 1, 1, MAX_N, True), max_tokens, sampling,
               number(body, "presence_penalty", 0.0, -2.0, 2.0), number(body, "frequency_penalty", 0.0, -2.0, 2.0),
               number(body, "seed", None, -2**63, 2**63 - 1, True), tuple(stop), None, stream,
               bool(options and options.get("include_usage")))


def completion_prompts(body: dict, encode: Callable[[str], list[int]] | None,
                       vocab_size: int) -> tuple[list[tuple[int, ...]], list[str | None]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of such lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p:
        raise APIError(400, f"prompt: expected a string, a list of strings, token ids or lists of token ids, "
                            f"found {str(p)[:60]}", param="prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    prompts, texts = [], []
    for i, item in enumerate(p):
        if isinstance(item, str):
            if encode is None:
                raise APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
            ids, text = encode(item), item
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids, text = item, None
        else:
            raise APIError(400, f"prompt[{i}]: expected a string or a list of token ids, found {str(item)[:60]}",
                           param="prompt")
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt[{i}]: token id {bad} outside the vocabulary [0, {vocab_size})", param="prompt")
        prompts.append(tuple(ids))
        texts.append(text)
    return prompts, texts
