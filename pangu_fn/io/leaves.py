"""Saving tree leaves that are not plain tensors (quantized weights).

Such a leaf class has a `kind` name, `to_tensors() -> {suffix: tensor}`, `describe() -> dict`
(JSON-able, holding its settings) and a classmethod `from_tensors(tensors, description)`.
Registered with `@register_leaf`, it is stored as tensors named `<leaf name>.<suffix>` plus
its description in config.json under "leaves"."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..errors import FormatError, PanguError

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


def check_descriptions(described: Any, where: str) -> dict[str, dict[str, Any]]:
    """`described` (config.json's "leaves") checked to map leaf names to objects with a string
    "kind"; returned unchanged. Raises FormatError naming the leaf and what was found."""
    if not isinstance(described, dict):
        raise FormatError(f"{where}: 'leaves' expected an object of leaf descriptions, found {repr(described)[:80]}")
    for name, desc in described.items():
        if not isinstance(desc, dict) or not isinstance(desc.get("kind"), str):
            raise FormatError(f"{where}: leaf {name[:80]!r}: expected an object with a string 'kind', "
                              f"found {repr(desc)[:80]}")
    return described


def decode(tensors: dict[str, Any], described: dict[str, dict[str, Any]], where: str = "config.json",
           read: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Inverse of `encode`: rebuild leaf objects from their tensors and descriptions. With `read`,
    `tensors` holds what `read` turns into a tensor (a loader's unread references), read one leaf
    at a time, so a leaf that re-lays its parts out (the AVX2 int4 tiles) holds one leaf's
    staging, not the whole model's. Raises FormatError for a description that is malformed or
    does not fit its tensors."""
    read = read or (lambda t: t)
    flat = dict(tensors)
    for name, desc in check_descriptions(described, where).items():
        prefix = name + "."
        parts = {k[len(prefix):]: read(flat.pop(k)) for k in list(flat) if k.startswith(prefix)}
        if not parts:
            raise FormatError(f"{where}: leaf {name}: described as {desc.get('kind')!r} but no tensors {prefix}* stored")
        try:
            flat[name] = leaf_type(desc["kind"]).from_tensors(parts, desc)
        except PanguError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # the reader's boundary
            raise FormatError(f"{where}: leaf {name}: description {repr(desc)[:120]} does not fit its tensors "
                              f"{ {k: list(t.shape) for k, t in parts.items()} }: {e!r}"[:400]) from None
    return {name: t if name in described else read(t) for name, t in flat.items()}


def check_no_stray_parts(flat: dict[str, Any], where: str) -> None:
    """Raise FormatError for a tensor stored under a leaf's name (`<...>.weight.<suffix>`)
    whose leaf config.json does not describe: without the description it cannot be rebuilt."""
    for name in flat:
        parts = name.split(".")
        if any(p in ("weight", "bias") for p in parts[:-1]):
            leaf = ".".join(parts[: max(i for i, p in enumerate(parts[:-1]) if p in ("weight", "bias")) + 1])
            raise FormatError(f"{where}: tensor {name!r} is part of the leaf {leaf!r}, which config.json's "
                              "'leaves' does not describe")
