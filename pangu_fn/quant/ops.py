"""The quantized matmuls as custom ops, for export.

Under `torch.compiler.is_exporting()` a quantized leaf's `linear` calls one of these instead
of a machine-specific kernel, so the exported graph holds one node per quantized linear with
the canonical tensors as inputs; `pangu_export` lowers them to ONNX (int8: DequantizeLinear +
MatMul; int4: com.microsoft MatMulNBits). Eagerly they compute dequantize-then-matmul.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .packing import from_matmul_nbits
from .rtn import int4_dequantize

# torch.library infers the op schemas from these hints; Optional[Tensor] is its spelling.
# ruff: noqa: UP045


@torch.library.custom_op("pangu::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`x [..., K] @ (qdata [N, K] int8 * scales [N, 1]).T + bias` in x's dtype."""
    w = (qdata.float() * scales.float()[:, None]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@int8_linear.register_fake
def _int8_linear_fake(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("pangu::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                group_size: int, in_features: int) -> torch.Tensor:
    """`x [..., K] @ dequant(qdata [N, K/G, G/2]).T + bias`, where value = (code - zero) * scale
    per group of `group_size` along K (zero 8 when `zero_points` is None)."""
    codes = from_matmul_nbits(qdata)
    w = int4_dequantize(codes, scales, zero_points, x.dtype)[:, :in_features]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@int4_linear.register_fake
def _int4_linear_fake(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                      zero_points: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      group_size: int, in_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))
