"""Typed errors of the runtime. It cannot import pangu_fn (that would import torch), so it
defines its own; every message says what was expected, what was found, and where."""

from __future__ import annotations


class PanguRuntimeError(ValueError):
    """Base class of every error pangu_runtime raises on bad input or a bad bundle."""


class BundleError(PanguRuntimeError):
    """A bundle folder is not usable: see the subclasses."""


class BundleFormatError(BundleError):
    """manifest.json is missing, malformed, or describes something this runtime cannot run."""


class BundleVersionError(BundleError):
    """The bundle was written in a newer format version than this runtime reads."""


class BundlePathError(BundleError):
    """A file named by the manifest is absolute, contains '..', or resolves outside the bundle."""


class BundleFileError(BundleError):
    """A file named by the manifest is missing."""


class BundleHashError(BundleError):
    """A file's sha256 differs from the one the manifest records."""


class GenerationError(PanguRuntimeError):
    """Prompts, lengths or sampling settings passed to `Session.generate` are invalid."""
