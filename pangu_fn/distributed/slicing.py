"""Cutting a rank's part out of one parameter: a float tensor, or a quantized leaf through
the tensors it is stored as (`to_tensors` / `from_tensors`, the save protocol).

A leaf of logical shape `[N, K]` stores tensors whose first dim is N (int8 `qdata [N, K]`,
`scales [N]`; int4 `qdata [N, K/G, G/2]`, `scales` and `zero_points [N, K/G]`), so a column
split (rows of N) cuts every stored tensor's dim 0. A row split (ranges of K) cuts dim 1 of the
stored tensors that have one, in its units (K / that dim: 1 for int8, the group size G for
int4) and keeps 1-D ones (per-row scales) whole; a range that would split a group raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..io.leaves import leaf_type
from ..io.source import CHUNK_BYTES
from .plan import Split

# (dim, start, stop) -> that slice of one stored tensor, as a tensor of its own
Reader = Callable[[int, int, int], torch.Tensor]


def cut(read: Reader, shape: tuple[int, ...], k: int, split: Split, where: str) -> torch.Tensor:
    """The part of a stored tensor of `shape` (belonging to a weight with K = `k` inputs) that
    `split` keeps: its ranges concatenated, then `split.pad` zero rows. Raises ConfigError when
    a row split would cut through a quantization group."""
    if split.how == "replicate" or (split.dim == 1 and len(shape) < 2):
        return read(0, 0, shape[0])
    ranges = split.ranges
    if split.dim == 1:
        unit = k // shape[1]
        bad = [(a, b) for a, b in ranges if a % unit or b % unit]
        if bad or k % shape[1]:
            raise ConfigError(f"tensor parallelism: {where} is stored in groups of {unit} inputs; the input "
                              f"columns {bad[0][0]}..{bad[0][1]} of this rank would split a group (use a world "
                              f"size or group size that keeps each rank's inputs whole groups)")
        ranges = tuple((a // unit, b // unit) for a, b in ranges)
    pieces = [read(split.dim, a, b) for a, b in ranges]
    t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, split.dim)
    if split.pad:
        t = torch.cat([t, t.new_zeros((split.pad, *t.shape[1:]))])
    return t


def cut_column_major(read: Reader, shape: tuple[int, ...], split: Split, dtype: torch.dtype) -> torch.Tensor:
    """`cut`'s part of a plain 2-D matrix as `dtype`, stored column-major (`decode_layout`'s
    layout of fp32 CPU weights: strides (1, rows)), filled from slabs of about `CHUNK_BYTES`
    along the split dim (rows for column / vocab splits and whole tensors, columns for row
    splits), so no row-major copy of the part is ever held."""
    dim = split.dim if split.how != "replicate" else 0
    ranges = split.ranges if split.how != "replicate" else ((0, shape[0]),)
    rows, cols = cut_shape(shape, split)
    buf = torch.empty(cols, rows, dtype=dtype)  # the transpose's storage
    step = max(1, CHUNK_BYTES // (buf.element_size() * max(shape[1 - dim], 1)))
    at = 0
    for a, b in ranges:
        for start in range(a, b, step):
            stop = min(start + step, b)
            piece = read(dim, start, stop).t()  # [K, rows] of a row slab, [cols, N] of a column slab
            if dim == 0:
                buf[:, at:at + stop - start] = piece
            else:
                buf[at:at + stop - start] = piece
            at += stop - start
    if split.pad:
        buf[:, at:] = 0
    return buf.t()


def cut_shape(shape: tuple[int, ...], split: Split) -> list[int]:
    """The logical shape of the part `split` keeps of a weight of `shape`."""
    if split.how == "replicate":
        return list(shape)
    out = list(shape)
    out[split.dim] = sum(b - a for a, b in split.ranges) + split.pad
    return out


def described(description: dict[str, Any], shape: tuple[int, ...], split: Split) -> dict[str, Any]:
    """A quantized leaf's description with the shape of its part."""
    return {**description, "shape": cut_shape(shape, split)}


def tensor_reader(t: torch.Tensor) -> Reader:
    """A Reader over a tensor in memory (each slice copied, so no part keeps the whole alive)."""
    return lambda dim, a, b: t.narrow(dim, a, b - a).clone()


def take(leaf: Any, split: Split, where: str) -> Any:
    """This rank's part of `leaf` (a tensor or a quantized leaf) as a leaf of the same kind."""
    if isinstance(leaf, torch.Tensor):
        k = leaf.shape[1] if leaf.dim() > 1 else 0
        return cut(tensor_reader(leaf), tuple(leaf.shape), k, split, where)
    if split.how == "replicate":
        return leaf
    k = leaf.shape[1]
    parts = {name: cut(tensor_reader(t), tuple(t.shape), k, split, f"{where}.{name}")
             for name, t in leaf.to_tensors().items()}
    return leaf_type(leaf.kind).from_tensors(parts, described(leaf.describe(), tuple(leaf.shape), split))
