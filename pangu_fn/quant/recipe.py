"""QuantRecipe: which weights `quantize` changes, and how.

Linears are named by their dotted path without `.weight` (`blocks.3.mlp.down`,
`query_layer.attn.q`, `lm_head`; a tied model's head is `tok_embed`). Patterns are shell
globs (`fnmatch`) over those names: `*.down`, `blocks.1[0-9].*`, `blocks.*.attn.o`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..params import parse_dtype

WHOLE_TREE = ("fp16", "bf16")  # casts of every float leaf
LINEAR = ("int8", "int4", "gptq")  # per-linear schemes; "gptq" is calibrated int4
SCHEMES = LINEAR + WHOLE_TREE
CHOICES = LINEAR + ("keep",)  # what an override or the head may say
GROUP_SIZES = (32, 64, 128)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize a params tree.

    - `scheme`: int8 (per-output-channel symmetric, weight-only) | int4 (round-to-nearest,
      groups of `group_size` along K) | gptq (calibrated int4, same layout) | fp16 | bf16.
    - `symmetric`: int4 / gptq without zero points (zero point 8); False stores them.
    - `keep`: patterns of block linears left in the compute dtype.
    - `overrides`: `(pattern, choice)` pairs, choice in int8 | int4 | gptq | keep; the last
      matching pair wins (e.g. `("*.down", "int8")` in an int4 recipe).
    - `head`: the LM head (a tied model's token embedding) stays in the compute dtype ("keep",
      the default) or is quantized with int8 / int4 (round-to-nearest).
    - `compute_dtype`: dtype of activations and of every float leaf left (embeddings, norms,
      biases, kept linears); default bf16 (fp16 for the fp16 scheme).
    - `prepack`: hold bf16 float linears as `DenseWeight` leaves (on the CPU: the native bf16
      kernel on the plain weight, or oneDNN's prepacked layout where that kernel cannot run,
      several times faster for one row than stock `F.linear`); False leaves plain tensors.
    - `damp`: gptq's dampening, as a fraction of the Hessian's mean diagonal.
    """

    scheme: str = "int8"
    group_size: int = 128
    symmetric: bool = True
    keep: tuple[str, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    head: str = "keep"
    compute_dtype: str | None = None
    prepack: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {self.scheme!r}; expected one of {list(SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"quantization group_size {self.group_size!r}: expected one of {list(GROUP_SIZES)}")
        for pattern, choice in self.overrides:
            if choice not in CHOICES:
                raise ConfigError(f"override {pattern!r}={choice!r}: expected a choice in {list(CHOICES)}")
        if self.head not in ("keep", "int8", "int4"):
            raise ConfigError(f"head {self.head!r}: expected 'keep', 'int8' or 'int4'")
        if self.scheme in WHOLE_TREE and (self.keep or self.overrides or self.head != "keep"):
            raise ConfigError(f"scheme {self.scheme!r} casts the whole tree; keep / overrides / head "
                              "apply to int8, int4 and gptq only")
        if self.compute_dtype is not None:
            parse_dtype(self.compute_dtype)
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"damp {self.damp!r}: expected a fraction in (0, 1)")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype the quantized tree runs in."""
        if self.scheme in WHOLE_TREE:
            return parse_dtype(self.scheme)
        return parse_dtype(self.compute_dtype or "bf16")

    def choice(self, name: str) -> str:
        """int8 | int4 | gptq | keep for the block linear `name`."""
        out = "keep" if any(fnmatch.fnmatchcase(name, p) for p in self.keep) else self.scheme
        for pattern, choice in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                out = choice
        return out

    def patterns(self) -> list[str]:
        return list(self.keep) + [p for p, _ in self.overrides]

    @property
    def calibrated(self) -> bool:
        return self.scheme == "gptq" or any(c == "gptq" for _, c in self.overrides)

    def summary(self) -> str:
        """One line for logs, e.g. `int4 g128 sym (keep *.down), head keep, compute bf16`."""
        parts = [self.scheme]
        if self.scheme in ("int4", "gptq"):
            parts.append(f"g{self.group_size} {'sym' if self.symmetric else 'asym'}")
        if self.keep:
            parts.append(f"(keep {' '.join(self.keep)})")
        parts += [f"{p}={c}" for p, c in self.overrides]
        return f"{' '.join(parts)}, head {self.head}, compute {DTYPE_NAMES[self.dtype]}"

    def describe(self) -> dict:
        """A JSON-able summary for reports."""
        return {"scheme": self.scheme, "group_size": self.group_size, "symmetric": self.symmetric,
                "keep": list(self.keep), "overrides": [list(o) for o in self.overrides],
                "head": self.head, "compute_dtype": DTYPE_NAMES[self.dtype],
                "prepack": self.prepack, **({"damp": self.damp} if self.calibrated else {})}


def parse_override(text: str) -> tuple[str, str]:
    """"PATTERN=CHOICE" -> (pattern, choice). Raises ConfigError."""
    pattern, sep, choice = text.rpartition("=")
    if not sep or not pattern or choice not in CHOICES:
        raise ConfigError(f"--override {text!r}: expected PATTERN=CHOICE with CHOICE in {list(CHOICES)}")
    return pattern, choice
