"""AdaptiveK: choose the draft length of the next step from the recent acceptance rate.

With a per-token acceptance rate a, a step that drafts K tokens yields on average
`(1 - a^(K+1)) / (1 - a)` tokens per row and costs about `1 + overhead + K * (cost + growth)`
target decode steps (`cost`: drafting one token; `growth`: verifying one more position;
`overhead`: the step's fixed extra work). A plain decode step (K = 0) yields 1 token for a cost
of 1. The controller picks the K in `0 .. k_max` with the most tokens per unit of cost, so it
falls back to plain decoding when speculation would lose, and probes with K = 1 every
`probe_every` plain steps to notice when drafts become good again. The rate is a decayed
count of accepted drafts over examined drafts (a draft is examined when all before it were
accepted), the maximum-likelihood estimate for that truncated geometric process.

The controller is a frozen value, updated only from token counts (never from wall-clock
time), so a run is reproducible for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InputError


@dataclass(frozen=True)
class AdaptiveK:
    k_max: int = 8
    cost: float | None = None  # None: the drafter's own estimate (Drafter.cost)
    overhead: float = 0.15
    growth: float = 0.03
    memory: float = 0.7  # weight of the past in the decayed counts
    probe_every: int = 8
    accepted: float = 1.0  # decayed counts; the prior is a = 0.5 with the weight of 2 drafts
    examined: float = 2.0
    plain_steps: int = 0  # consecutive K = 0 steps

    def __post_init__(self) -> None:
        if not (isinstance(self.k_max, int) and self.k_max >= 1):
            raise InputError(f"AdaptiveK: expected an int k_max >= 1, found {self.k_max!r}")
        if not 0 <= self.memory < 1:
            raise InputError(f"AdaptiveK: expected 0 <= memory < 1, found {self.memory}")

    @property
    def rate(self) -> float:
        """The current estimate of the per-token acceptance rate."""
        return self.accepted / self.examined

    def speedup(self, k: int, cost: float) -> float:
        """Expected tokens per unit of target-step time for draft length k (1.0 for k = 0)."""
        if k == 0:
            return 1.0
        a = min(self.rate, 1 - 1e-6)
        return (1 - a ** (k + 1)) / (1 - a) / (1 + self.overhead + k * (cost + self.growth))

    def choose(self, drafter_cost: float) -> int:
        """The draft length for the next step."""
        cost = self.cost if self.cost is not None else drafter_cost
        best = max(range(self.k_max + 1), key=lambda k: self.speedup(k, cost))
        if best == 0 and self.plain_steps >= self.probe_every:
            return 1
        return best

    def update(self, k: int, accepted: int, examined: int) -> "AdaptiveK":
        """The controller after a step with draft length k that examined and accepted that many drafts."""
        if k == 0:
            return replace(self, plain_steps=self.plain_steps + 1)
        if examined == 0:  # nothing was drafted (e.g. no n-gram matched)
            return replace(self, plain_steps=0)
        m = self.memory
        return replace(self, accepted=m * self.accepted + accepted, examined=m * self.examined + examined,
                       plain_steps=0)
