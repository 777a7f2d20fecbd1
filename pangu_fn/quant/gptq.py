"""GPTQ (Frantar et al., 2022): int4 codes chosen column by column along K, each column's
rounding error spread over the columns not yet quantized, weighted by the inverse Hessian of
the layer's inputs, so the layer's output error `||(W - Q) X||` is small rather than the
weight error. Groups of G columns share a scale (and zero point), computed from the group's
error-updated weights when its first column is reached; the layout is the same as RTN int4."""

from __future__ import annotations

import torch

from ..errors import InputError
from .rtn import int4_codes, int4_params

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
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, blocks, dtype=scale_dtype, device=w.device)
    zeros = None if symmetric else torch.empty(n, blocks, dtype=torch.uint8, device=w.device)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            g = col // group_size
            if col % group_size == 0:
                s, z = int4_params(wb[:, i:i + group_size], symmetric, scale_dtype)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            s, z = scales[:, g], None if zeros is None else zeros[:, g]
            q = int4_codes(wb[:, i], s, z)
            codes[:, col] = q
            value = (q.float() - (8.0 if z is None else z.float())) * s.float()
            e = (wb[:, i] - value) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes, scales, zeros
