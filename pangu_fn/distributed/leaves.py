"""Parallel leaves: weights that bring their own collective, as quantized leaves bring their
own kernel, so the model definition stays one.

- `RowParallel`: a row-parallel linear's local columns `[N, K / world]`; `linear` is the local
  product, then an all-reduce (sum) of the `[..., N]` partial results, then the bias, once.
- `VocabParallel`: a vocab-parallel table's local rows `[ceil(V / world), H]` (zero rows pad
  the last rank); `embedding` looks up the ids this rank holds (others give zeros) and
  all-reduces, `linear` (the LM head, tied or not) computes the local logits and all-gathers
  them into `[..., V]`.

The local weight is a float tensor or a quantized leaf. Eager collectives are c10d's (the
lowest latency; on gloo a small sum is an all-gather and a local add, see `all_reduce`);
traced, torch.distributed's functional ones, so a forward through
these leaves traces with torch.compile(fullgraph=True).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .timing import record


def _eager(x: torch.Tensor) -> bool:
    """True outside tracing and autograd: the in-place c10d collectives may then run."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or x.requires_grad)


GATHER_BYTES = 256 * 1024  # on gloo, sums of at most this many bytes are gathered, then added


def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum of `x` over the ranks of `group` (in `x`'s dtype; callers pass a tensor they just
    made and use only the result). In eager mode c10d's collectives, which cost a third to a
    half of the functional ones' latency on gloo (0.42 vs 0.99 ms for 1536 floats, 2 ranks on
    loopback). On gloo a tensor of at most `GATHER_BYTES` (a decode step's hidden states) is
    all-gathered and added locally in rank order: one exchange where gloo's ring all-reduce
    makes two, 0.6-0.8x its cost for 1536 values at 2 ranks (`python -m
    pangu_tools.allreduce_latency`), and every rank adds the same numbers in the same order,
    so all get the same bits. Larger ones (prefill) are all-reduced in place. Traced, the
    functional all-reduce, which torch.compile understands."""
    if _eager(x):
        x = x.contiguous()
        start = time.perf_counter()
        if x.dim() and x.numel() * x.element_size() <= GATHER_BYTES and dist.get_backend(group) == "gloo":
            world = dist.get_world_size(group)
            parts = x.new_empty((world * x.shape[0], *x.shape[1:]))  # rank-major along dim 0
            dist.all_gather_single(parts, x, group=group)
            x = parts.view(world, *x.shape).sum(0)
        else:
            dist.all_reduce(x, group=group)
        record(start)
        return x
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def all_gather_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`x [..., C]` of every rank concatenated in rank order along the last dim: `[..., world * C]`."""
    if _eager(x):
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # rank-major along dim 0
        start = time.perf_counter()
        dist.all_gather_single(out, x.contiguous(), group=group)
        record(start)
        return out.view(world, *x.shape).movedim(0, -2).flatten(-2)
    return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), x.dim() - 1, group))


class _Parallel:
    """What both leaves share: the local weight, its group, size and dtype facts."""

    kind = ""

    def __init__(self, local: Any, group: Any = None) -> None:
        self.local, self.group = local, group

    @property
    def _group(self) -> Any:
        return self.group if self.group is not None else dist.group.WORLD

    @property
    def shape(self) -> torch.Size:
        """The local weight's shape (what this rank holds)."""
        return torch.Size(self.local.shape)

    def numel(self) -> int:
        return int(self.local.numel())

    @property
    def nbytes(self) -> int:
        t = self.local
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else int(t.nbytes)

    @property
    def compute_dtype(self) -> torch.dtype:
        t = self.local
        return t.dtype if isinstance(t, torch.Tensor) else t.compute_dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def scheme(self) -> str:
        t = self.local
        return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else t.scheme

    def is_floating_point(self) -> bool:
        return isinstance(self.local, torch.Tensor) and self.local.is_floating_point()

    def _local_linear(self, x: torch.Tensor) -> torch.Tensor:
        from ..layers import linear  # layers imports params; a module-level import would cycle

        return linear(x, {"weight": self.local})

    def with_local(self, local: Any) -> _Parallel:
        """The same leaf around another local weight (quantized, cast or moved)."""
        raise NotImplementedError

    def to(self, device: str | torch.device) -> _Parallel:
        return self.with_local(self.local.to(device))

    def astype(self, dtype: torch.dtype) -> _Parallel:
        t = self.local
        return self.with_local(t.to(dtype) if isinstance(t, torch.Tensor) else t.astype(dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheme}, local shape={list(self.shape)})"


class RowParallel(_Parallel):
    """Row-parallel linear: local weight `[N, K / world]` (the columns of this rank's inputs)."""

    kind = "row_parallel"

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x [..., K / world]` (this rank's part of the input) -> `[..., N]`, summed over ranks;
        the bias is added after the sum, once."""
        y = all_reduce(self._local_linear(x), self._group)
        return y if bias is None else y + bias

    def with_local(self, local: Any) -> RowParallel:
        return RowParallel(local, self.group)


class VocabParallel(_Parallel):
    """Vocab-parallel table: rows `start .. start + rows - 1` of the `[V, H]` embedding / head,
    held as `[ceil(V / world), H]` (zero rows past `rows`)."""

    kind = "vocab_parallel"

    def __init__(self, local: Any, start: int, rows: int, vocab_size: int, group: Any = None) -> None:
        super().__init__(local, group)
        self.start, self.rows, self.vocab_size = start, rows, vocab_size

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of `tokens [...]` -> `[..., H]`: each rank looks up the ids it holds, zeros for
        the others, and the sum over ranks is the full lookup."""
        ids = tokens - self.start
        mine = (ids >= 0) & (ids < self.rows)
        ids = torch.where(mine, ids, torch.zeros_like(ids))
        t = self.local
        rows = F.embedding(ids, t) if isinstance(t, torch.Tensor) else t.embedding(ids)
        rows = torch.where(mine[..., None], rows, torch.zeros_like(rows))
        return all_reduce(rows, self._group)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[..., V]` of `x [..., H]` from the local `[..., V / world]`: in eager mode a
        `ShardedLogits` that gathers them only when an op needs the whole vocabulary (greedy
        decoding does not); traced, gathered from every rank."""
        y = self._local_linear(x)
        if bias is None and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            from .logits import ShardedLogits  # it imports this module

            return ShardedLogits(y, self.start, self.rows, self.vocab_size, self._group)
        y = all_gather_last(y, self._group)[..., : self.vocab_size]
        return y if bias is None else y + bias

    def with_local(self, local: Any) -> VocabParallel:
        return VocabParallel(local, self.start, self.rows, self.vocab_size, self.group)
