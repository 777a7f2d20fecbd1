"""Typed errors. Every message says what was expected, what was found, and where."""

from __future__ import annotations


class PanguError(Exception):
    """Base class of every error pangu-fn raises on bad input."""


class ConfigError(PanguError, ValueError):
    """A configuration, preset, recipe or option is unknown or inconsistent."""


class InputError(PanguError, ValueError):
    """Tokens, prompts or sampling settings passed to a model function are invalid."""


class ShapeError(PanguError, ValueError):
    """A parameter tensor's shape disagrees with the config or with its neighbours."""


class FormatError(PanguError, ValueError):
    """A file (checkpoint, tokenizer, bundle) is malformed, truncated or unsupported."""
