"""AdaptiveK: choose the draft length of the next step from the recent acceptance rate.

With a per-token acceptance rate a, a step that drafts K tokens yields on average
`(1 - a^(K+1)) / (1 - a)` tokens per row; it costs `fixed + K * per_token` plain decode steps
(`fixed`: verifying K+1 positions plus the step's bookkeeping; `per_token`: drafting one
token). A plain step (K = 0) yields 1 token for a cost of 1. The controller drafts the K in
`1 .. k_max` with the most tokens per unit of cost, and falls back to plain decoding when no K
would pay even with `optimism` more drafts counted as accepted (default 1). The benefit of the
doubt is there because the two mistakes are not alike: a plain step tells nothing about the
drafts, so a switch to plain decoding on a dip of the rate estimate (a few unlucky drafts)
lasts until the next probe, while a speculative step that barely pays keeps measuring; drafts
that cannot pay at any rate (too costly) still never run. Plain, it probes with K = 1 after
`probe_every` plain steps to notice when drafts become good again (the gap doubles after each
probe that does not resume speculation, up to 8 times) (with `timed`, also right after the
first plain step, to measure the drafting cost instead of trusting a guess).

The rate is a decayed count of accepted over examined drafts (a draft is examined when all
before it were accepted: the maximum-likelihood estimate for that truncated geometric
process), starting from an optimistic prior (0.8, weight of 2 drafts).

Costs: with `timed` (default) they are decayed means of the measured seconds (CPU time of the
process on the CPU, so that a shared machine's preemptions do not count; wall time after a
device sync elsewhere) of plain steps, of drafting per token and of verifying (a drop is trusted more than a rise: timing noise only
adds), because the real ratios depend on the machine and
dtype (e.g. on a CPU whose fp32 matmul slows down for more than one row, verifying 5
positions costs 1.4 plain steps; in bf16 1.1). The first step is then a plain one, to time it.
Greedy output does not depend on K; sampled output keeps the target's distribution, but with
`timed` a seed no longer fixes the exact draws (K follows the clock). `timed=False` uses
`cost` (default: the drafter's structural estimate) and `overhead` instead and reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InputError

PROBE_K = 1
MAX_BACKOFF = 3  # probe at least every 8 * probe_every plain steps


@dataclass(frozen=True)
class AdaptiveK:
    k_max: int = 8
    timed: bool = True
    cost: float | None = None  # drafting one token, in plain steps (None: spec_init fills in Drafter.cost)
    overhead: float = 0.15  # timed=False: fixed = 1 + overhead
    memory: float = 0.9  # weight of the past in the decayed counts and means
    optimism: float = 1.0  # drafts counted as accepted when deciding whether to draft at all
    probe_every: int = 4
    accepted: float = 1.6
    examined: float = 2.0
    plain_s: float | None = None  # seconds of a plain step
    draft_s: float | None = None  # seconds per drafted token
    verify_s: float | None = None  # seconds of a speculative step's verification
    plain_steps: int = 0  # consecutive plain steps
    backoff: int = 0  # probes in a row that did not resume speculation: the gap doubles each time

    def __post_init__(self) -> None:
        if not (isinstance(self.k_max, int) and not isinstance(self.k_max, bool) and self.k_max >= 1):
            raise InputError(f"AdaptiveK: expected an int k_max >= 1, found {self.k_max!r}")
        if not 0 <= self.memory < 1:
            raise InputError(f"AdaptiveK: expected 0 <= memory < 1, found {self.memory}")
        if not self.optimism >= 0:
            raise InputError(f"AdaptiveK: expected optimism >= 0, found {self.optimism}")

    @property
    def rate(self) -> float:
        """The current estimate of the per-token acceptance rate."""
        return self.accepted / self.examined

    def costs(self) -> tuple[float, float]:
        """(fixed, per_token): a speculative step's cost in plain steps."""
        if self.timed and self.plain_s and self.draft_s is not None and self.verify_s is not None:
            return self.verify_s / self.plain_s, self.draft_s / self.plain_s
        return 1 + self.overhead, self.cost or 0.0

    def speedup(self, k: int, bonus: float = 0.0) -> float:
        """Expected tokens per unit of plain-step time for draft length k (1.0 for k = 0), with
        `bonus` more drafts counted as accepted."""
        if k == 0:
            return 1.0
        a = min((self.accepted + bonus) / (self.examined + bonus), 1 - 1e-6)
        fixed, per_token = self.costs()
        return (1 - a ** (k + 1)) / (1 - a) / (fixed + k * per_token)

    def choose(self) -> int:
        """The draft length for the next step."""
        if self.timed and self.plain_s is None:
            return 0
        best = max(range(1, self.k_max + 1), key=self.speedup)
        if max(self.speedup(k, self.optimism) for k in range(1, self.k_max + 1)) >= 1:
            return best
        unmeasured = self.timed and self.draft_s is None
        if unmeasured or self.plain_steps >= self.probe_every << min(self.backoff, MAX_BACKOFF):
            return min(PROBE_K, self.k_max)
        return 0

    def update(self, k: int, accepted: int, examined: int, draft_s: float = 0.0,
               verify_s: float = 0.0) -> AdaptiveK:
        """The controller after a step that drafted k tokens per row (0: a plain step), examined
        and accepted that many drafts, and spent those seconds drafting and verifying."""
        m = self.memory

        def mean(old: float | None, new: float) -> float:
            """Decayed mean of durations; timing noise (preemption, a first call's warm-up) only
            adds, so a drop is trusted more than a rise, and a rise counts at most double."""
            if old is None:
                return new
            return (old + new) / 2 if new < old else m * old + (1 - m) * min(new, 2 * old)

        if k == 0:
            return replace(self, plain_steps=self.plain_steps + 1, plain_s=mean(self.plain_s, verify_s))
        probe = self.plain_steps > 0  # a speculative step right after plain ones
        return replace(self, accepted=m * self.accepted + accepted, examined=m * self.examined + examined,
                       plain_steps=0, backoff=self.backoff + 1 if probe else 0,
                       draft_s=mean(self.draft_s, draft_s / k), verify_s=mean(self.verify_s, verify_s))
