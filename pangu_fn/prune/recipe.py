"""PruneRecipe: what to prune, how much, and how to score it (a frozen, JSON-able value)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

METHODS = ("magnitude", "wanda", "n:m", "structured", "iterative")
GRANULARITIES = ("layer", "global", "row")
TENSOR_GROUPS = ("blocks", "embeddings", "head")
SCORES = ("magnitude", "wanda")
IMPORTANCES = ("magnitude", "activation", "taylor")
ALLOCATIONS = ("layer", "global")
BASES = ("magnitude", "wanda", "structured")
RECOVERY_LOSSES = ("next-token", "distill")


@dataclass(frozen=True)
class PruneRecipe:
    """One pruning job. Fields a method does not use are ignored by it.

    - `magnitude` / `wanda`: zero exactly `floor(sparsity * n + 0.5)` weights with the lowest score
      per `granularity` group: "layer" (each tensor), "global" (all tensors in scope together)
      or "row" (each output row; Wanda's comparison group). Scores: |W| (magnitude) or
      |W| * ||X_j||_2 over calibration tokens (wanda).
    - `n:m`: in every run of `m` consecutive inputs of a row, zero the `n` lowest-`score` weights
      (Wanda's convention; 2:4 and 4:8 are the hardware formats).
    - `structured`: remove the fraction `heads` of each layer's KV groups (a KV head with its
      query heads) and `ffn` of its FFN neurons, by `importance`; `allocation` "layer" removes
      the same fraction in every block, "global" ranks all blocks together (each keeps at least
      one group and one neuron). `multiple_of` rounds each block's kept FFN width to a multiple
      (e.g. the int4 group size; the count removed then differs from the fraction by less than
      half a multiple per block). `remove_heads` / `remove_neurons` ({block index: [ids]})
      remove exactly the listed KV groups / neurons instead.
    - `iterative`: `rounds` rounds of the `base` method following the cubic schedule from
      `initial_sparsity` to `sparsity` (or to `heads` / `ffn` when `base` is "structured"),
      each followed by `recovery_steps` steps of `recovery_loss` training on calibration text:
      "distill" (KL to the dense model, the default) or "next-token".
    - `tensors`: "blocks" (every linear weight of the blocks), "embeddings", "head".
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    granularity: str = "layer"
    tensors: tuple[str, ...] = ("blocks",)
    n: int = 2
    m: int = 4
    score: str = "magnitude"
    heads: float = 0.0
    ffn: float = 0.0
    importance: str = "magnitude"
    allocation: str = "layer"
    multiple_of: int = 1
    remove_heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    remove_neurons: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    rounds: int = 4
    initial_sparsity: float = 0.0
    base: str = "magnitude"
    recovery_steps: int = 200
    recovery_loss: str = "distill"
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 128
    calib_samples: int = 32
    calib_seq_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tensors, (list, str)):  # accept ["blocks", "head"] or "blocks"
            tensors = [self.tensors] if isinstance(self.tensors, str) else self.tensors
            object.__setattr__(self, "tensors", tuple(tensors))

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"PruneRecipe.{name}: expected one of {allowed}, found {getattr(self, name)!r}")

        def fraction(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0 or math.isnan(value):
                raise ConfigError(f"PruneRecipe.{name}: expected a fraction in [0, 1), found {value!r}")

        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ConfigError(f"PruneRecipe.{name}: expected an integer >= {minimum}, found {value!r}")

        choice("method", METHODS)
        choice("granularity", GRANULARITIES)
        choice("score", SCORES)
        choice("importance", IMPORTANCES)
        choice("allocation", ALLOCATIONS)
        choice("base", BASES)
        choice("recovery_loss", RECOVERY_LOSSES)
        for name in ("sparsity", "heads", "ffn", "initial_sparsity"):
            fraction(name)
        for name in ("n", "rounds", "batch_size", "seq_len", "calib_samples", "calib_seq_len", "multiple_of"):
            positive(name)
        positive("m", 2)
        positive("recovery_steps", 0)
        if self.n >= self.m:
            raise ConfigError(f"PruneRecipe: n:m pruning zeroes n of every m weights; expected n < m, "
                              f"found {self.n}:{self.m}")
        if not isinstance(self.tensors, tuple) or not self.tensors or any(t not in TENSOR_GROUPS for t in self.tensors):
            raise ConfigError(f"PruneRecipe.tensors: expected a non-empty tuple from {TENSOR_GROUPS}, "
                              f"found {self.tensors!r}")
        if self.method == "iterative" and self.base != "structured" and self.initial_sparsity > self.sparsity:
            raise ConfigError(f"PruneRecipe: initial_sparsity {self.initial_sparsity} exceeds the target "
                              f"sparsity {self.sparsity}")
        if not self.lr > 0:
            raise ConfigError(f"PruneRecipe.lr: expected a positive learning rate, found {self.lr!r}")
        for name in ("remove_heads", "remove_neurons"):
            for layer, ids in dict(getattr(self, name)).items():
                if not isinstance(layer, int) or not all(isinstance(i, int) and i >= 0 for i in ids):
                    raise ConfigError(f"PruneRecipe.{name}: expected {{block index: [non-negative ids]}}, "
                                      f"found {layer!r}: {ids!r}")

    @property
    def structured_explicit(self) -> bool:
        """True when the recipe names the heads / neurons to remove."""
        return bool(self.remove_heads) or bool(self.remove_neurons)

    def replace(self, **changes: Any) -> PruneRecipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensors"] = list(self.tensors)
        d["remove_heads"] = {str(k): list(v) for k, v in dict(self.remove_heads).items()}
        d["remove_neurons"] = {str(k): list(v) for k, v in dict(self.remove_neurons).items()}
        return d

    def summary(self) -> str:
        """A short human description, e.g. "magnitude 50% per layer"."""
        if self.method in ("magnitude", "wanda"):
            return f"{self.method} {self.sparsity:.0%} per {self.granularity}"
        if self.method == "n:m":
            return f"{self.n}:{self.m} by {self.score}"
        if self.method == "structured":
            if self.structured_explicit:
                return "structured (explicit heads/neurons)"
            return f"structured heads {self.heads:.0%} ffn {self.ffn:.0%} by {self.importance} ({self.allocation})"
        target = (f"heads {self.heads:.0%} ffn {self.ffn:.0%}" if self.base == "structured"
                  else f"{self.sparsity:.0%}")
        return (f"iterative {self.base} to {target} in {self.rounds} rounds, "
                f"{self.recovery_steps} {self.recovery_loss} recovery steps each")


def count_for(fraction: float, n: int) -> int:
    """The exact number of items a fraction of `n` means: round half up, `floor(f * n + 0.5)`."""
    return math.floor(fraction * n + 0.5)


def parse_structured(spec: str) -> dict[str, float]:
    """"heads=0.25,ffn=0.5" -> {"heads": 0.25, "ffn": 0.5}; raises ConfigError on anything else."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        if key not in ("heads", "ffn") or not value:
            raise ConfigError(f"structured spec: expected 'heads=F,ffn=F', found {spec!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ConfigError(f"structured spec: {key}={value!r} is not a number (in {spec!r})") from None
    return out


def parse_nm(spec: str) -> tuple[int, int]:
    """"2:4" -> (2, 4); raises ConfigError on anything else."""
    a, sep, b = spec.partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise ConfigError(f"n:m spec: expected two integers like '2:4', found {spec!r}")
    return int(a), int(b)
