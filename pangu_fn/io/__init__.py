"""Checkpoint input and output: our folder format and the layouts `load` recognises."""

from .checkpoint import load, load_config, save

__all__ = ["load", "load_config", "save"]
