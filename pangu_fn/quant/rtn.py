"""Round-to-nearest quantizers (the conventions of ONNX Runtime's MatMulNBits quantizer).

- int8, per output channel, symmetric: `scale = absmax / 127`, codes in [-127, 127].
- int4, per group of G along K, codes 0..15, value = (code - zero) * scale:
  symmetric: `scale = m / -8` where m is the group's value of largest magnitude (so m maps to
  code 0 and the zero point is 8); asymmetric: the range [min(w, 0), max(w, 0)] in 15 steps,
  `zero = round(-min / scale)`.

Scales are stored in `scale_dtype`; a scale that rounds to a smaller magnitude there is moved
one step up, and codes are computed with the stored scale, so every weight is within half a
step of its dequantized value (except symmetric int4's top code: a value of the opposite sign
to m with magnitude above 7.5 steps clamps to 7, one step away at most).
"""

from __future__ import annotations

import torch


def stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `scale` in `dtype`, rounded away from zero when rounding shrank it."""
    s = scale.to(dtype)
    shrunk = s.float().abs() < scale.abs()
    if shrunk.any():
        s = torch.where(shrunk, torch.nextafter(s, s * float("inf")), s)
    return s


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale in fp32, 0 where the scale is 0 (an all-zero row or group)."""
    s = scale.float()
    return torch.where(s == 0, torch.zeros_like(s), 1.0 / s)


def int8_scales(w: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Per-row scales `[N]` of `w [N, K]`."""
    return stored_scale(w.float().abs().amax(dim=1) / 127.0, scale_dtype)


def int8_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes `[N, K]` of `w` for the given per-row scales."""
    return torch.round(w.float() * reciprocal(scales)[:, None]).clamp_(-127, 127).to(torch.int8)


def int4_params(groups: torch.Tensor, symmetric: bool, scale_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, zero points or None) for weight groups `[..., G]`; zero points uint8 0..15."""
    g = groups.float()
    if symmetric:
        hi, lo = g.amax(-1), g.amin(-1)
        m = torch.where(hi.abs() > lo.abs(), hi, lo)
        return stored_scale(m / -8.0, scale_dtype), None
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = stored_scale((hi - lo) / 15.0, scale_dtype)
    zeros = torch.round(-lo * reciprocal(scales)).clamp_(0, 15).to(torch.uint8)
    return scales, zeros


def int4_codes(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Codes 0..15 (uint8) of `groups [..., G]` (or single columns `[...]` with matching
    scales) for the given scales and zero points (None: 8)."""
    zero = 8.0 if zeros is None else zeros.float()
    r, z = reciprocal(scales), zero
    if groups.dim() == scales.dim() + 1:
        r = r[..., None]
        z = z[..., None] if zeros is not None else z
    return (torch.round(groups.float() * r) + z).clamp_(0, 15).to(torch.uint8)


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """Values `[N, K]` in `dtype` of codes `[N, K]` with group scales / zero points `[N, K/G]`:
    `(code - zero) * scale`, one rounding (code - zero is an exact small integer)."""
    n, k = codes.shape
    blocks = scales.shape[1]
    zero = 8 if zeros is None else zeros.to(dtype)[..., None]
    w = (codes.view(n, blocks, k // blocks).to(dtype) - zero) * scales.to(dtype)[..., None]
    return w.view(n, k)
