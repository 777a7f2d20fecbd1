"""pangu-fn: Pangu language models as stateless functions over parameter trees and an
explicit KV-cache state."""

from . import distributed
from .cache import KVCache, init_cache
from .config import PRESETS, ModelConfig
from .device import device_info, empty_cache, memory_stats, select_device, synchronize
from .distributed import shard
from .errors import ConfigError, FormatError, InputError, PanguError, ShapeError
from .generate import Completion, TokenEvent, generate, stream
from .io import load, save
from .model import forward
from .params import astype, init_params, to_device, validate
from .prune import PruneRecipe, PruneReport, prune  # the function shadows the subpackage's name
from .quant import QuantRecipe, quantize
from .sampling import SamplingParams
from .speculative import (
    AdaptiveK,
    DraftModel,
    LookupFirst,
    PromptLookup,
    SelfDraft,
    SpecStats,
    spec_init,
    spec_step,
    speculative_generate,
    speculative_stream,
)
from .tree import count_params, nbytes

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "AdaptiveK", "Completion", "ConfigError", "DraftModel", "FormatError", "InputError", "KVCache",
    "LookupFirst", "ModelConfig", "PanguError", "PromptLookup", "PruneRecipe", "PruneReport", "QuantRecipe", "SamplingParams",
    "SelfDraft", "ShapeError", "SpecStats", "TokenEvent", "astype", "count_params", "device_info", "distributed", "empty_cache",
    "forward", "generate", "init_cache", "init_params", "load", "memory_stats", "nbytes", "prune", "quantize",
    "save", "select_device", "shard", "spec_init", "spec_step", "speculative_generate", "speculative_stream", "stream",
    "synchronize", "to_device", "validate",
]
