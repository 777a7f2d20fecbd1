"""GPTQ (Frantar et al., 2022): int4 codes chosen column by column along K, each column's
rounding error spread over the columns not yet quantized, weighted by the inverse Hessian of
the layer's inputs, so the layer's output error `||(W - Q) X||` is small rather than the
weight error. Groups of G columns share a scale (and zero point), computed from the group's
error-updated weights when its first column is reached; the layout is the same as RTN int4."""

from __future__ import annotations

import torch

from ..errors import InputError
from .rtn import int4_params, reciprocal

BLOCK = 128  # columns updated lazily as one block (a multiple of every group size)


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, symmetric: bool,
              scale_dtype: torch.dtype, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes `[N, K]` uint8, scales `[N, K/G]`, zero points `[N, K/G]` or None) for `weight
    [N, K]` and the input Hessian `[K, K]`. Raises InputError if the dampened Hessian is
    not positive definite."""
    w = weight.float().clone()
    h = hessian.float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if info:
        raise InputError(f"gptq: the calibration Hessian [{k}, {k}] is not positive definite even "
                         f"after dampening {damp}; use more calibration text or a larger damp")
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)  # upper factor of H^-1

    blocks = k // group_size
    codes = torch.empty(k, n, device=w.device)  # float codes, column by column (rows of W^T)
    scales = torch.empty(n, blocks, dtype=scale_dtype, device=w.device)
    zeros = None if symmetric else torch.empty(n, blocks, dtype=torch.uint8, device=w.device)
    wt = w.t().contiguous()  # [K, N]: each column of W is a contiguous row here
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        block, ub = wt[b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.empty_like(block)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # the group's scale from its error-updated weights
                g = col // group_size
                s, z = int4_params(block[i:i + group_size].t(), symmetric, scale_dtype)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
                inv, step = reciprocal(s), s.float()
                zero = 8.0 if z is None else z.float()
            q = (torch.round(block[i] * inv) + zero).clamp_(0, 15)
            codes[col] = q
            e = (block[i] - (q - zero) * step) / ub[i, i]
            block[i:] -= ub[i, i:, None] * e[None, :]
            err[i] = e
        wt[b1:] -= u[b0:b1, b1:].t() @ err
    return codes.t().to(torch.uint8), scales, zeros
