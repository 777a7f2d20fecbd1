"""ModelConfig: one frozen config for the three Pangu families, and their presets.

The config holds what the parameter shapes cannot tell (norm type, activation, positions,
epsilons, special token ids). Per-layer widths (query heads, KV heads, FFN neurons) are read
from the parameter shapes by `layer_sizes`, so pruned models need no config surgery.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

FAMILIES = ("gpt", "alpha", "openpangu")
ACTIVATIONS = ("gelu_tanh", "gelu", "fast_gelu", "silu")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. `num_layers` counts ordinary blocks only; PanGu-α's top
    query layer is the extra block switched on by `query_layer` (Hugging Face's
    `num_layers` for gpt_pangu is our `num_layers + 1`)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (up -> act -> down) | "swiglu" (act(gate) * up -> down)
    activation: str = "gelu_tanh"  # "gelu_tanh" | "gelu" | "fast_gelu" (x * sigmoid(1.702 x)) | "silu"
    positions: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    query_layer: bool = False
    tie_embeddings: bool = True
    attn_bias: bool = True
    mlp_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # the layout the weights were read from (e.g. MindSpore "mindformers" / "release" naming):
    # the default layout to write them back in; not part of the architecture (not compared)
    source_layout: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"ModelConfig: expected {what}, found {self!r}")

        need(self.family in FAMILIES, f"family in {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} a positive int")
        need(self.num_heads % self.num_kv_heads == 0, "num_heads divisible by num_kv_heads")
        need(self.norm in ("layernorm", "rmsnorm"), "norm 'layernorm' or 'rmsnorm'")
        need(self.mlp in ("gelu", "swiglu"), "mlp 'gelu' or 'swiglu'")
        need(self.activation in ACTIVATIONS, f"activation in {ACTIVATIONS}")
        need(self.positions in ("learned", "rope"), "positions 'learned' or 'rope'")
        need(self.positions != "rope" or self.head_dim % 2 == 0, "an even head_dim for RoPE")

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """A config from a dict (as `to_dict` writes). Raises ConfigError for unknown or
        missing keys and for a value whose JSON type differs from the field's (a string
        number, a bool for an int, a non-finite float) or an int beyond 2**31."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k)[:40] for k in set(d) - set(fields))
        if unknown:
            raise ConfigError(f"ModelConfig: unknown keys {unknown}; expected a subset of {sorted(fields)}")
        for key, value in d.items():
            kind = str(fields[key].type)
            if not _JSON_TYPES.get(kind, lambda v: True)(value):
                raise ConfigError(f"ModelConfig: {key} expected {kind}, found {repr(value)[:80]}")
        try:
            return cls(**d)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"ModelConfig: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, deep nesting
            raise ConfigError(f"ModelConfig: expected JSON, found a parse error: {str(e)[:200]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"ModelConfig: expected a JSON object, found {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named preset (see `PRESETS`); raises ConfigError for an unknown name."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    @property
    def num_blocks(self) -> int:
        """Blocks holding a KV cache: ordinary blocks plus the query layer."""
        return self.num_layers + int(self.query_layer)


def _int(v: Any) -> bool:
    return type(v) is int and abs(v) < 2**31


def _float(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


# checks of the JSON values `from_dict` accepts, by field annotation
_JSON_TYPES: dict[str, Any] = {
    "int": _int, "float": _float, "str": lambda v: type(v) is str, "bool": lambda v: type(v) is bool,
    "int | None": lambda v: v is None or _int(v), "str | None": lambda v: v is None or type(v) is str}


def _gpt(**kw: Any) -> ModelConfig:
    """Seed GPT-style / PanGu-α: pre-LayerNorm, GELU MLP with biases, learned positions."""
    h, heads = kw["hidden_size"], kw["num_heads"]
    base = {"family": "gpt", "num_kv_heads": heads, "head_dim": h // heads, "intermediate_size": 4 * h,
            "vocab_size": 40000, "max_seq_len": 1024, "bos_token_id": 9, "eos_token_id": 9, "pad_token_id": 6}
    return ModelConfig(**{**base, **kw})


def _openpangu(**kw: Any) -> ModelConfig:
    """openPangu-Embedded: pre-RMSNorm, SwiGLU without bias, RoPE, GQA, bias on q/k/v/o."""
    base = {"family": "openpangu", "norm": "rmsnorm", "mlp": "swiglu", "activation": "silu",
            "positions": "rope", "mlp_bias": False, "attn_bias": True, "vocab_size": 153376,
            "max_seq_len": 32768, "bos_token_id": 1, "eos_token_id": 45892, "pad_token_id": 0}
    return ModelConfig(**{**base, **kw})


def _alpha(**kw: Any) -> ModelConfig:
    return _gpt(family="alpha", query_layer=True, **kw)


PRESETS: dict[str, ModelConfig] = {
    # The seed's GPT-style presets.
    "pangu-1b": _gpt(hidden_size=2048, num_layers=24, num_heads=16),
    "pangu-7b": _gpt(hidden_size=4096, num_layers=40, num_heads=32),
    # PanGu-α: Hugging Face num_layers 24 / 32 / 40 includes the query layer.
    "pangu-alpha-350m": _alpha(hidden_size=1024, num_layers=23, num_heads=16),
    "pangu-alpha-2.6b": _alpha(hidden_size=2560, num_layers=31, num_heads=32),
    "pangu-alpha-13b": _alpha(hidden_size=5120, num_layers=39, num_heads=40),
    "openpangu-embedded-1b": _openpangu(hidden_size=1536, num_layers=26, num_heads=12,
                                        num_kv_heads=6, head_dim=128, intermediate_size=6144,
                                        rope_theta=4.0e6, tie_embeddings=True),
    "openpangu-embedded-7b": _openpangu(hidden_size=4096, num_layers=34, num_heads=32,
                                        num_kv_heads=8, head_dim=128, intermediate_size=12800,
                                        rope_theta=1.6e7, tie_embeddings=False),
    # The GPT-2-small shape, used by the benchmarks to compare with peers.
    "gpt2-small": _gpt(hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257,
                       bos_token_id=50256, eos_token_id=50256, pad_token_id=None),
    # Tiny presets for tests.
    "tiny-gpt": _gpt(hidden_size=64, num_layers=2, num_heads=4, vocab_size=256,
                     max_seq_len=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-alpha": _alpha(hidden_size=64, num_layers=2, num_heads=4, vocab_size=256,
                         max_seq_len=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-openpangu": _openpangu(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=16, intermediate_size=128, vocab_size=256,
                                 max_seq_len=256, rope_theta=10000.0, bos_token_id=1,
                                 eos_token_id=2, pad_token_id=0),
}
