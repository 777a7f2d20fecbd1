"""Bit layouts of 4-bit weights.

- Canonical (ONNX `MatMulNBits`): `[N, K/G, G/2]` uint8, two values per byte along K, low
  nibble first. Saved, exported and handed to other runtimes.
- CPU kernel (`torch._weight_int4pack_mm_for_cpu`): the layout `_convert_weight_to_int4pack_for_cpu`
  makes, machine dependent (it blocks rows by the SIMD width). Built when a leaf is made;
  `cpu_unpack` inverts it (checked once per process against torch's packer) so the leaf need
  not keep both copies.
- AVX2 tiles (`native_avx2.c`'s tiled int4 product): `[ceil(N/8), K/8, 8, 4]` uint8; tile t,
  step s, row j, byte i holds the codes of row 8t + j at k = 8s + i (low nibble) and 8s + 4 + i
  (high nibble), so one 32-byte load is 64 codes of 8 rows (rows past N: padding). Held by a
  leaf in place of the canonical copy where that kernel runs; `from_tiles` inverts it exactly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import ShapeError

CPU_ROW_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu` needs N % 16 == 0


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 `[..., 2m]` -> `[..., m]`, low nibble first."""
    if values.shape[-1] % 2:
        raise ShapeError(f"pack_nibbles: expected an even last dimension, found shape {list(values.shape)}")
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: `[..., m]` uint8 -> `[..., 2m]` values 0..15."""
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    torch.bitwise_right_shift(packed, 4, out=out[..., 1::2])
    return out


def to_matmul_nbits(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes `[N, K]` (0..15) -> MatMulNBits data `[N, K/G, G/2]` uint8."""
    n, k = codes.shape
    return pack_nibbles(codes.reshape(n, k // group_size, group_size)).contiguous()


def from_matmul_nbits(qdata: torch.Tensor) -> torch.Tensor:
    """MatMulNBits data `[N, K/G, G/2]` -> codes `[N, K]` uint8 (0..15)."""
    return unpack_nibbles(qdata).reshape(qdata.shape[0], -1)


def to_tiles(codes: torch.Tensor) -> torch.Tensor:
    """Codes `[N, K]` (0..15; K a multiple of 8) -> AVX2 tiles `[ceil(N/8), K/8, 8, 4]` uint8
    (rows past N are padding, code 0)."""
    n, k = codes.shape
    if k % 8:
        raise ShapeError(f"to_tiles: expected codes [N, K] with K a multiple of 8, found {list(codes.shape)}")
    c = F.pad(codes.to(torch.uint8), (0, 0, 0, -n % 8)).reshape(-1, 8, k // 8, 8).transpose(1, 2)
    return (c[..., :4] | (c[..., 4:] << 4)).contiguous()


def from_tiles(tiles: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of `to_tiles`: `[T, S, 8, 4]` uint8 -> codes `[n, 8S]` uint8 (0..15; n default 8T)."""
    t, s = tiles.shape[:2]
    c = torch.cat([tiles & 0x0F, tiles >> 4], dim=-1)  # [T, S, 8 rows, 8 k]
    return c.transpose(1, 2).reshape(8 * t, 8 * s)[: 8 * t if n is None else n]


def int4_codes(qdata: torch.Tensor, n: int) -> torch.Tensor:
    """Codes `[n, K]` of MatMulNBits data (`[n, K/G, G/2]` or `[n, K/2]`) or of AVX2 tiles."""
    return from_tiles(qdata, n) if qdata.dim() == 4 else from_matmul_nbits(qdata)


def cpu_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes `[N, K]` (0..15, N a multiple of 16) -> the CPU kernel's packed weight."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def cpu_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """Codes `[n, k]` from `cpu_pack`'s output, or None when this machine's layout is not one
    `cpu_unpack` knows (the caller then keeps the canonical copy)."""
    layout = _cpu_layout()
    return None if layout is None else _unpack_layout(packed, n, k, *layout)


def _unpack_layout(packed: torch.Tensor, n: int, k: int, block: int, split: bool) -> torch.Tensor:
    """Rows come in blocks of `block` (a final shorter block holds adjacent row pairs). In a
    full block with `split`, byte j of column k holds rows j (low) and j + block/2 (high);
    otherwise byte j holds rows 2j (low) and 2j + 1 (high). The bytes are first transposed to
    `[rows/2, k]`, then split into nibbles four bytes at a time (int32 words, k % 4 == 0)."""
    flat = packed.reshape(-1)
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    full = n // block
    if full:
        b = flat[: full * k * block // 2].view(full, k, block // 2).transpose(1, 2).contiguous()
        rows = out[: full * block].view(full, 2, block // 2, k) if split else \
            out[: full * block].view(full, block // 2, 2, k).transpose(1, 2)
        _split_nibbles(b, rows[:, 0], rows[:, 1])
    tail = n - full * block
    if tail:
        b = flat[full * k * block // 2:].view(k, tail // 2).t().contiguous()  # [tail/2, k]
        rows = out[full * block:].view(tail // 2, 2, k)
        _split_nibbles(b, rows[:, 0], rows[:, 1])
    return out


def _split_nibbles(b: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """low = b & 15, high = b >> 4 for uint8 `b [..., k]` (contiguous), written into the uint8
    views `low` / `high` (contiguous last dim), as int32 words."""
    words = b.view(torch.int32)
    torch.bitwise_and(words, 0x0F0F0F0F, out=low.view(torch.int32))
    torch.bitwise_and(words >> 4, 0x0F0F0F0F, out=high.view(torch.int32))


def cpu_layout_known() -> bool:
    """Whether `cpu_unpack` inverts this machine's packer."""
    return _cpu_layout() is not None


def cpu_row_block() -> int | None:
    """Rows per block of this machine's packed layout: slices of a packed weight start at
    multiples of it (None when `cpu_layout_known()` is false)."""
    layout = _cpu_layout()
    return None if layout is None else layout[0]


@functools.lru_cache(maxsize=1)
def _cpu_layout() -> tuple[int, bool] | None:
    """Which known layout torch's packer uses here: found by packing a probe (two full
    64-row blocks and a 48-row tail) and unpacking it with each candidate."""
    gen = torch.Generator().manual_seed(0)
    n, k = 176, 64
    probe = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    try:
        packed = cpu_pack(probe)
    except RuntimeError:
        return None
    for layout in ((64, True), (32, True), (32, False)):
        if torch.equal(_unpack_layout(packed, n, k, *layout), probe):
            return layout
    return None
