"""speculative_stream / speculative_generate: `stream` / `generate` with a drafter.

Same arguments, stopping rules (eos, max_new_tokens), events and return values as
`pangu_fn.generate.stream` / `generate`, plus the drafter, the draft length and optional
statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import compiled
from ..compiled import CompileOptions
from ..config import ModelConfig
from ..generate import Completion, TokenEvent
from ..params import Params
from ..sampling import SamplingParams
from .adaptive import AdaptiveK
from .drafters import Model, make_drafter
from .step import StepStats, spec_init, spec_step

GREEDY = SamplingParams()


@dataclass
class SpecStats:
    """Totals over a speculative run: `steps` target verification calls, `drafted` and
    `accepted` draft tokens summed over rows, `tokens` kept by the steps (per row: accepted
    + 1), `row_steps` the sum over steps of the rows running, seconds spent in prefill,
    drafting and verifying, and how many steps used each draft length. With an adaptive K,
    `adaptive` is the controller as the last call left it: pass it as the next call's
    `adaptive` to start from the rates and costs it measured (a warm start)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    row_steps: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    k_used: dict[int, int] = field(default_factory=dict)
    adaptive: AdaptiveK | None = None

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.drafted += step.drafted
        self.accepted += step.accepted
        self.tokens += step.tokens
        self.row_steps += step.rows
        self.draft_s += step.draft_s
        self.verify_s += step.verify_s
        self.k_used[step.k] = self.k_used.get(step.k, 0) + 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens a row gains per target call of the decode loop (1.0 for plain decoding)."""
        return self.tokens / self.row_steps if self.row_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_call": round(self.tokens_per_call, 4), "prefill_s": round(self.prefill_s, 4),
                "draft_s": round(self.draft_s, 4), "verify_s": round(self.verify_s, 4),
                "k_used": dict(sorted(self.k_used.items()))}

    def summary(self) -> str:
        return (f"{self.steps} steps, acceptance {self.acceptance_rate:.1%} ({self.accepted}/{self.drafted}), "
                f"{self.tokens_per_call:.2f} tokens per target call, draft {self.draft_s:.2f} s, "
                f"verify {self.verify_s:.2f} s")


def speculative_stream(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       sampling: SamplingParams = GREEDY, seed: int = 0,
                       eos_token_ids: Iterable[int] | None = None, *, drafter: Any = "self", k: int = 4,
                       adaptive: AdaptiveK | bool = False, stats: SpecStats | None = None,
                       compile: bool | str | CompileOptions = False) -> Iterator[TokenEvent]:
    """Yield TokenEvents like `stream`, decoding speculatively. Greedy output equals `stream`'s
    token for token; sampled output has the same distribution (not the same draws).

    `drafter`: "self" (the target's first quarter of layers), "lookup" (n-gram prompt lookup),
    a `(params, cfg)` draft model with the target's vocabulary, or a Drafter. `k` (>= 1)
    tokens are drafted per step; with `adaptive` (True or an AdaptiveK) k is the upper bound
    and each step's length follows the recent acceptance rate. When `stats` is given, it is
    updated in place as steps run. `compile` (as `stream`'s) runs the target's verification
    calls as compiled programs over a static cache (one program per rows x draft length).
    Raises InputError / ConfigError like `stream`, and for a drafter with another vocabulary
    or k < 1."""
    opts = compiled.options(compile)
    target = Model(params, cfg, None if opts is None else compiled.programs(params, cfg, opts))
    drafter = make_drafter(drafter)
    device = params["tok_embed"]["weight"].device
    rng = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        state, events = spec_init(target, drafter, prompts, max_new_tokens, sampling, rng, eos_token_ids, k, adaptive)
    if stats is not None:
        stats.prefill_s += time.perf_counter() - start
    yield from events
    while state.rows:
        with torch.inference_mode():
            state, events, step = spec_step(target, drafter, state, sampling, rng)
        if stats is not None:
            stats.add(step)
            stats.adaptive = state.adaptive
        yield from events


def speculative_generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         sampling: SamplingParams = GREEDY, seed: int = 0,
                         eos_token_ids: Iterable[int] | None = None, *, drafter: Any = "self", k: int = 4,
                         adaptive: AdaptiveK | bool = False, stats: SpecStats | None = None,
                         compile: bool | str | CompileOptions = False) -> list[Completion]:
    """New tokens for each prompt and why each stopped, like `generate`; see `speculative_stream`."""
    out = [Completion([], "length") for _ in prompts]
    for ev in speculative_stream(params, cfg, prompts, max_new_tokens, sampling, seed, eos_token_ids,
                                 drafter=drafter, k=k, adaptive=adaptive, stats=stats, compile=compile):
        out[ev.row].tokens.append(ev.token)
        if ev.finish_reason:
            out[ev.row].finish_reason = ev.finish_reason
    return out
