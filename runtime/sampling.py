"""SamplingParams and the logits -> token step in numpy, with the semantics of
`pangu_fn.sampling`: greedy, temperature, top-k, top-p, repetition penalty (CTRL rule).
All randomness comes from an explicit `numpy.random.Generator`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters;
    repetition_penalty > 1 divides positive logits of tokens already seen and multiplies
    negative ones."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GenerationError(f"SamplingParams: expected temperature >= 0, found {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise GenerationError(f"SamplingParams: expected an int top_k >= 0, found {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"SamplingParams: expected 0 < top_p <= 1, found {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"SamplingParams: expected repetition_penalty > 0, found {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: np.ndarray, seen: np.ndarray | None, penalty: float) -> np.ndarray:
    """The repetition penalty on `logits [..., V]` where `seen [..., V]` (bool) is set."""
    if seen is None or penalty == 1.0:
        return logits
    scaled = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, scaled, logits)


def filter_logits(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p on float32 `logits [..., V]`; tokens outside the
    support get -inf. Expects temperature > 0."""
    logits = logits.astype(np.float32) / np.float32(sp.temperature)
    vocab = logits.shape[-1]
    if 0 < sp.top_k < vocab:
        kth = -np.partition(-logits, sp.top_k - 1, axis=-1)[..., sp.top_k - 1: sp.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if sp.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, axis=-1))
        # drop a token when the tokens ranked above it already reach top_p (the top one stays)
        drop_sorted = (np.cumsum(probs, axis=-1) - probs) >= sp.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """The distribution a sampler draws from, `[..., V]` float32 (greedy: a one-hot)."""
    if sp.greedy:
        out = np.zeros(logits.shape, np.float32)
        np.put_along_axis(out, logits.argmax(-1)[..., None], 1.0, axis=-1)
        return out
    return softmax(filter_logits(logits, sp))


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of `probs [B, V]` by inverse CDF on one uniform draw per row."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(-1), probs.shape[-1] - 1).astype(np.int64)


def sample(logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> np.ndarray:
    """One token per row from `logits [B, V]` -> `[B]` int64."""
    logits = penalize(logits.astype(np.float32), seen, sp.repetition_penalty)
    if sp.greedy:
        return logits.argmax(-1).astype(np.int64)
    return draw(softmax(filter_logits(logits, sp)), rng)
