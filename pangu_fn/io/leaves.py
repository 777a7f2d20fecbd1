"""Saving tree leaves that are not plain tensors (quantized weights).

Such a leaf class has a `kind` name, `to_tensors() -> {suffix: tensor}`, `describe() -> dict`
(JSON-able, holding its settings) and a classmethod `from_tensors(tensors, description)`.
Registered with `@register_leaf`, it is stored as tensors named `<leaf name>.<suffix>` plus
its description in config.json under "leaves"."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import FormatError

LEAF_TYPES: dict[str, type] = {}
# modules that register leaf kinds, imported on demand when a checkpoint names an unknown kind
LEAF_MODULES = ("pangu_fn.quant",)


def register_leaf(cls: type) -> type:
    LEAF_TYPES[cls.kind] = cls
    return cls


def leaf_type(kind: str) -> type:
    if kind not in LEAF_TYPES:
        for module in LEAF_MODULES:
            importlib.import_module(module)
    if kind not in LEAF_TYPES:
        raise FormatError(f"unknown leaf kind {kind!r}; known kinds {sorted(LEAF_TYPES)}")
    return LEAF_TYPES[kind]


def encode(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Flat tree -> (flat tensors, {leaf name: description}) for saving."""
    tensors, described = {}, {}
    for name, leaf in flat.items():
        if hasattr(leaf, "to_tensors"):
            described[name] = {"kind": leaf.kind, **leaf.describe()}
            tensors.update({f"{name}.{suffix}": t for suffix, t in leaf.to_tensors().items()})
        else:
            tensors[name] = leaf
    return tensors, described


def decode(tensors: dict[str, Any], described: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Inverse of `encode`: rebuild leaf objects from their tensors and descriptions."""
    flat = dict(tensors)
    for name, desc in described.items():
        prefix = name + "."
        parts = {k[len(prefix):]: flat.pop(k) for k in list(flat) if k.startswith(prefix)}
        if not parts:
            raise FormatError(f"leaf {name}: described as {desc.get('kind')!r} but no tensors {prefix}* stored")
        flat[name] = leaf_type(desc["kind"]).from_tensors(parts, desc)
    return flat
