"""Run exported bundles with numpy and onnxruntime only (import name pangu_runtime); never imports torch.

    from pangu_runtime import Session, SamplingParams
    s = Session("out/bundle")
    s.generate([[1, 2, 3]], max_new_tokens=32)
"""

from .errors import (
                     BundleError,
                     BundleFileError,
                     BundleFormatError,
                     BundleHashError,
                     BundlePathError,
                     BundleVersionError,
                     GenerationError,
                     PanguRuntimeError,
)
from .lookup import PromptLookup, draft_tokens
from .manifest import FORMAT, VERSION, load_manifest
from .sampling import SamplingParams, probabilities
from .session import Completion, Session, TokenEvent

__all__ = [
    "FORMAT", "VERSION", "BundleError", "BundleFileError", "BundleFormatError", "BundleHashError",
    "BundlePathError", "BundleVersionError", "Completion", "GenerationError", "PanguRuntimeError",
    "PromptLookup", "SamplingParams", "Session", "TokenEvent", "draft_tokens", "load_manifest", "probabilities",
]
