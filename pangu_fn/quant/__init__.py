"""Quantization as tree transforms: `quantize(params, QuantRecipe(...)) -> params`.

Schemes: int8 (per-output-channel symmetric, weight-only), int4 (group-wise, ONNX MatMulNBits
layout), gptq (calibrated int4), fp16, bf16. Quantized weights are leaves (`Int8Weight`,
`Int4Weight`, `DenseWeight`) that bring their own kernels and save with `pangu_fn.save`.
Importing this package registers the leaf kinds and the `torch.ops.pangu.*` export ops.
"""

from . import ops  # noqa: F401  (registers torch.ops.pangu.int8_linear / int4_linear)
from .calibrate import calibration_windows, collect_hessians
from .recipe import SCHEMES, QuantRecipe, parse_override
from .report import size_report
from .transform import block_linears, head_name, quantize, quantize_int4, quantize_int8
from .weights import DenseWeight, Int4Weight, Int8Weight, is_quantized

__all__ = [
    "SCHEMES", "DenseWeight", "Int4Weight", "Int8Weight", "QuantRecipe", "block_linears", "calibration_windows",
    "collect_hessians", "head_name", "is_quantized", "parse_override", "quantize", "quantize_int4",
    "quantize_int8", "size_report",
]
