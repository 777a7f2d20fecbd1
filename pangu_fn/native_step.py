"""The fused decode step: every block of a few-row forward in one native call (`native_step.c`).

Eager PyTorch spends most of a small model's decode step between operators (about 40 per
block: norms, projections, RoPE, cache writes, attention, residuals, each a few microseconds of
Python and dispatch). `fused_blocks` hands the embedded tokens to C, which runs the blocks, the
final norm and PanGu-α's query layer with the AVX2 products of `native_avx2.c` and returns the
final hidden states; `model.forward` then applies the LM head as usual. It runs when all hold:

- eager inference on the CPU (no autograd, no tracing), a KV cache, at most `MAX_ROWS` rows
  (batch x new tokens: decode steps, speculative verification, small server steps);
- the AVX2 library builds here (`native.step_library()`: any x86-64 CPU with AVX2 and FMA);
- every block's linear is a kind it takes: fp32 (row-major with K % 32 == 0, or column-major as
  `params.decode_layout` stores it, N % 8 == 0 and K % 4 == 0), bf16 (K % 32 == 0), an int8 leaf
  (K % 32 == 0) or an int4 leaf with native kernel data (G % 32 == 0), biases fp32 or bf16; or
  a row-parallel leaf (tensor parallelism) around one of those, whose product C sums over the
  ranks through a callback into the leaf's own `all_reduce` before adding the bias once;
- the cache buffers are `[B, kv_heads_i, S, D]` CPU tensors in the compute dtype, contiguous.

Otherwise it returns None and the PyTorch blocks run. `PANGU_FN_FUSED=0` or `disabled()` turns
it off (A/B timing in one process). The arithmetic is fp32 throughout (bf16 and quantized trees
included: their activations are bf16 in PyTorch), with keys and values rounded to the cache's
dtype as PyTorch stores them, so logits agree with the PyTorch blocks within the tree's dtype
tolerance (fp32: summation order only). The C code trusts pointers and sizes, so everything it
reads is checked here: shapes chain through every block when the plan is made, and each call
checks the cache buffers and the positions.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from . import native
from .cache import KVCache, compute_dtype
from .config import ModelConfig
from .params import Params

# Up to this many rows (batch x new tokens) a forward step runs fused.
MAX_ROWS = 16
PLANS_KEPT = 8  # trees whose plans are kept (each plan holds its tree)

LIN_NONE, LIN_F32, LIN_F32T, LIN_BF16, LIN_INT8, LIN_INT4, LIN_INT4T = range(7)
ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "fast_gelu": 2, "silu": 3}
S_BF16, B_BF16 = native.SCALES_BF16, native.BIAS_BF16
_FLOATS = (torch.float32, torch.bfloat16)

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("pangu_fn_fused_step", default=True)


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("flags", ctypes.c_int32), ("reduce", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("group", ctypes.c_int64), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Norm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("b", ctypes.c_void_p), ("bf16", ctypes.c_int32)]


_LINEARS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
_REDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64)  # sums a float buffer over the ranks


class _Block(ctypes.Structure):
    _fields_ = [("attn_norm", _Norm), ("mlp_norm", _Norm), *[(n, _Linear) for n in _LINEARS],
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("layers", ctypes.c_int64),
                ("rope_rows", ctypes.c_int64), ("rms", ctypes.c_int32), ("act", ctypes.c_int32),
                ("swiglu", ctypes.c_int32), ("query_layer", ctypes.c_int32), ("cache_bf16", ctypes.c_int32),
                ("query_bf16", ctypes.c_int32), ("rope_bf16", ctypes.c_int32), ("eps", ctypes.c_float),
                ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p), ("query_embed", ctypes.c_void_p),
                ("reduce", _REDUCE),
                ("blocks", ctypes.POINTER(_Block)), ("final_norm", _Norm)]


class _Unsupported(Exception):
    """The tree has something the fused step does not take (the PyTorch blocks run instead)."""


class Plan:
    """One tree's blocks as the C structs `pangu_step` reads: `kv_heads[i]` per cache layer,
    `positions` the rows of the position tables. It holds the tree's leaves only weakly
    (`fits`): the structs point into them while a caller holds the tree, and a plan whose leaves
    are gone, or are not the tree's, is never used."""

    def __init__(self, params: Params, cfg: ModelConfig) -> None:
        self.keep: list[torch.Tensor] = []  # tensors the plan itself holds (RoPE tables, the query table)
        # tensor parallelism: the row-parallel weights' group as they name it (None: the default
        # group, looked up at each sum; the plan never holds a process group alive)
        self.reduces, self.group = False, None
        self.dtype = compute_dtype(params)
        if self.dtype not in _FLOATS:
            raise _Unsupported(f"compute dtype {self.dtype}")
        if cfg.activation not in ACTIVATIONS or cfg.norm not in ("layernorm", "rmsnorm"):
            raise _Unsupported(f"{cfg.activation} / {cfg.norm}")
        h, d = cfg.hidden_size, cfg.head_dim
        self.hidden, self.head_dim = h, d
        blocks = list(params["blocks"]) + ([params["query_layer"]] if cfg.query_layer else [])
        self.blocks = (_Block * len(blocks))(*[self._block(b, cfg, i == cfg.num_layers) for i, b in enumerate(blocks)])
        self.kv_heads = [b.kv_heads for b in self.blocks]
        self.positions = cfg.max_seq_len
        model = _Model(hidden=h, head_dim=d, layers=len(blocks), rms=int(cfg.norm == "rmsnorm"),
                       act=ACTIVATIONS[cfg.activation], swiglu=int(cfg.mlp == "swiglu"),
                       query_layer=int(cfg.query_layer), cache_bf16=int(self.dtype == torch.bfloat16),
                       eps=cfg.norm_eps, blocks=self.blocks, final_norm=self._norm(params["final_norm"], cfg))
        if cfg.positions == "rope":
            from .backend import _rope_table  # the tables the PyTorch blocks use

            cos, sin = _rope_table(cfg.rope_theta, d, cfg.max_seq_len, torch.device("cpu"), self.dtype)
            model.rope_cos, model.rope_sin = self._ptr(cos, (cfg.max_seq_len, d)), self._ptr(sin, (cfg.max_seq_len, d))
            model.rope_rows, model.rope_bf16 = cfg.max_seq_len, int(cos.dtype == torch.bfloat16)
            self.keep += [cos, sin]  # the table cache may drop them
        if cfg.query_layer:
            table = params["query_embed"]["weight"]
            if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != h:
                raise _Unsupported("query_embed")
            self.keep.append(table.to(self.dtype))
            model.query_embed = self._ptr(self.keep[-1], tuple(table.shape))
            model.query_bf16 = int(self.dtype == torch.bfloat16)
            self.positions = min(self.positions, table.shape[0])
        if self.reduces:
            self.reduce = _REDUCE(_reducer(self.group))  # held here: C calls it
            model.reduce = self.reduce
        self.model = model
        self.leaves = [weakref.ref(leaf) for leaf in _leaves(params)]

    def fits(self, params: Params) -> bool:
        """Whether `params` holds exactly the leaves this plan was made from (all still alive)."""
        leaves = _leaves(params)
        return len(leaves) == len(self.leaves) and all(r() is leaf for r, leaf in zip(self.leaves, leaves))

    def _ptr(self, t: torch.Tensor, shape: tuple[int, ...]) -> int:
        """`t`'s data pointer after checking it is a contiguous CPU fp32 / bf16 tensor of `shape`."""
        if not (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in _FLOATS
                and tuple(t.shape) == shape and t.is_contiguous()):
            raise _Unsupported(f"expected a contiguous CPU float tensor {list(shape)}")
        return t.data_ptr()

    def _norm(self, p: Params, cfg: ModelConfig) -> _Norm:
        w, b = p["weight"], p.get("bias") if cfg.norm == "layernorm" else None
        if not isinstance(w, torch.Tensor) or (b is not None and (not isinstance(b, torch.Tensor) or b.dtype != w.dtype)):
            raise _Unsupported("norm")
        h = cfg.hidden_size
        return _Norm(w=self._ptr(w, (h,)), b=None if b is None else self._ptr(b, (h,)),
                     bf16=int(w.dtype == torch.bfloat16))

    def _linear(self, p: Params, n: int | None, k: int) -> _Linear:
        """The struct of `p = {"weight", "bias"?}` mapping k inputs to n outputs (None: any n)."""
        w, bias = p["weight"], p.get("bias")
        if getattr(w, "kind", None) == "row_parallel":  # sharded: the local product, summed over the ranks
            if self.reduces and w.group is not self.group:
                raise _Unsupported("row-parallel weights of several groups")
            self.reduces, self.group = True, w.group
            out = self._linear({"weight": w.local, **({"bias": bias} if bias is not None else {})}, n, k)
            out.reduce = 1
            return out
        shape = tuple(w.shape)
        if len(shape) != 2 or shape[1] != k or (n is not None and shape[0] != n) or shape[0] == 0:
            raise _Unsupported(f"linear {list(shape)} for {k} inputs")
        n = shape[0]
        out = _Linear(n=n, k=k)
        if bias is not None:
            out.bias = self._ptr(bias, (n,))
            out.flags |= B_BF16 if bias.dtype == torch.bfloat16 else 0
        kind = getattr(w, "kind", None)
        if isinstance(w, torch.Tensor) and w.device.type == "cpu":
            if w.dtype == torch.float32 and w.is_contiguous() and k % 32 == 0:
                out.kind, out.w = LIN_F32, self._ptr(w, shape)
            elif w.dtype == torch.float32 and w.t().is_contiguous() and n % 8 == 0 and k % 4 == 0:
                out.kind, out.w = LIN_F32T, self._ptr(w.t(), (k, n))
            elif w.dtype == torch.bfloat16 and w.is_contiguous() and k % 32 == 0:
                out.kind, out.w = LIN_BF16, self._ptr(w, shape)
        elif kind == "int8" and w.qdata.device.type == "cpu" and k % 32 == 0:
            out.kind = LIN_INT8
            if not (w.qdata.dtype == torch.int8 and w.qdata.is_contiguous()):
                raise _Unsupported("int8 data")
            out.w, out.scales = w.qdata.data_ptr(), self._ptr(w.scales, (n,))
            out.flags |= S_BF16 if w.scales.dtype == torch.bfloat16 else 0
        elif kind == "int4" and w.native_kernel_data is not None and w.group_size % 32 == 0 and k % w.group_size == 0:
            qdata, scales, zeros = w.native_kernel_data
            g = w.group_size
            tiled = qdata.dim() == 4  # AVX2 tiles (quant/packing.py)
            if not (qdata.dtype == torch.uint8 and qdata.is_contiguous()
                    and (tuple(qdata.shape) == ((n + 7) // 8, k // 8, 8, 4) if tiled else qdata.numel() == n * k // 2)
                    and (zeros is None or (zeros.dtype == torch.uint8 and zeros.is_contiguous()
                                           and tuple(zeros.shape) == (n, k // g)))):
                raise _Unsupported("int4 data")
            out.kind, out.group, out.w = LIN_INT4T if tiled else LIN_INT4, g, qdata.data_ptr()
            out.scales = self._ptr(scales, (n, k // g))
            out.zeros = None if zeros is None else zeros.data_ptr()
            out.flags |= S_BF16 if scales.dtype == torch.bfloat16 else 0
        if out.kind == LIN_NONE:
            raise _Unsupported(f"weight {type(w).__name__} {getattr(w, 'dtype', kind)} {list(shape)}")
        return out

    def _block(self, p: Params, cfg: ModelConfig, query_layer: bool) -> _Block:
        h, d = cfg.hidden_size, cfg.head_dim
        attn, mlp = p["attn"], p["mlp"]
        out = _Block(attn_norm=self._norm(p["attn_norm"], cfg), mlp_norm=self._norm(p["mlp_norm"], cfg))
        if "qkv" in attn:  # fused: q has cfg.num_heads heads, k and v the rest (layers.attention)
            if query_layer:
                raise _Unsupported("a fused query layer")
            out.qkv = self._linear(attn["qkv"], None, h)
            out.heads, rest = cfg.num_heads, out.qkv.n - cfg.num_heads * d
            out.kv_heads = rest // (2 * d)
            if rest <= 0 or rest % (2 * d):
                raise _Unsupported("qkv width")
        else:
            out.q = self._linear(attn["q"], None, h)
            out.k = self._linear(attn["k"], None, h)
            out.v = self._linear(attn["v"], out.k.n, h)
            if out.q.n % d or out.k.n % d:
                raise _Unsupported("head widths")
            out.heads, out.kv_heads = out.q.n // d, out.k.n // d
        if out.heads == 0 or out.kv_heads == 0 or out.heads % out.kv_heads:
            raise _Unsupported(f"{out.heads} query heads over {out.kv_heads} KV heads")
        out.o = self._linear(attn["o"], h, out.heads * d)
        if cfg.mlp == "swiglu" and "gate_up" in mlp:
            out.gate_up = self._linear(mlp["gate_up"], None, h)
            ffn = out.gate_up.n // 2
            if out.gate_up.n % 2:
                raise _Unsupported("gate_up width")
        elif cfg.mlp == "swiglu":
            out.gate = self._linear(mlp["gate"], None, h)
            out.up = self._linear(mlp["up"], out.gate.n, h)
            ffn = out.up.n
        else:
            out.up = self._linear(mlp["up"], None, h)
            ffn = out.up.n
        out.down = self._linear(mlp["down"], h, ffn)
        return out


def _reducer(group: Any) -> Any:
    """The C step's `reduce`: sums a float buffer over `group`'s ranks in place (the row-parallel
    leaves' own `all_reduce`, so collective timing and the gloo gather path are the same)."""
    import torch.distributed as dist

    from .distributed.leaves import all_reduce

    def reduce(pointer: int, n: int) -> int:
        try:
            buf = torch.frombuffer((ctypes.c_float * n).from_address(pointer), dtype=torch.float32)
            buf.copy_(all_reduce(buf.clone(), group if group is not None else dist.group.WORLD))
        except Exception:  # noqa: BLE001  (a C caller cannot take an exception; the step falls back)
            return -1
        return 0

    return reduce


def _leaves(params: Params) -> list[Any]:
    """Every leaf object the fused step reads (tensors and quantized leaves), in a fixed order."""
    out: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif node is not None:
            out.append(node)

    for name in ("blocks", "final_norm", "query_layer", "query_embed"):
        walk(params.get(name))
    return out


_plans: OrderedDict[tuple[int, ModelConfig], Plan | None] = OrderedDict()
_lock = threading.Lock()
# The tree last planned, held strongly so that its identity cannot be reused: a step with the
# same tree then skips `Plan.fits` (a walk over every leaf, ~0.1 ms at GPT-2-small). It is
# released by the next tree planned or by `clear_plans`.
_last: tuple[Params, ModelConfig, Plan | None] | None = None


def plan(params: Params, cfg: ModelConfig) -> Plan | None:
    """The fused step's plan of this tree, or None where it does not run. Plans are made once
    per tree and config (the `PLANS_KEPT` latest are kept) and hold no tree alive; a kept plan
    is used only while the tree holds the very leaves it was made from (`Plan.fits`). The last
    tree planned is held until another is planned or `clear_plans` is called."""
    global _last
    key = (id(params), cfg)
    with _lock:
        if _last is not None and _last[0] is params and _last[1] == cfg:
            return _last[2]
        kept = _plans.get(key, False)
        if kept is not False:
            _plans.move_to_end(key)
    if kept is False or (kept is not None and not kept.fits(params)):
        try:
            kept = Plan(params, cfg)
        except (_Unsupported, KeyError, TypeError, AttributeError):
            kept = None
    with _lock:
        _plans[key] = kept
        while len(_plans) > PLANS_KEPT:
            _plans.popitem(last=False)
        _last = (params, cfg, kept)
    return kept


def clear_plans() -> None:
    """Forget every plan and the last tree planned (the only one a plan holds alive)."""
    global _last
    with _lock:
        _plans.clear()
        _last = None


def enabled() -> bool:
    return _enabled.get() and os.environ.get("PANGU_FN_FUSED", "1") != "0"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch blocks instead in this thread (or task) while inside."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


def fused_blocks(params: Params, cfg: ModelConfig, x: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache) -> torch.Tensor | None:
    """The final hidden states `[B, T, H]` (x's dtype) of embedded tokens `x [B, T, H]` at
    `positions [B, T]`, with the new keys and values written into `cache`'s buffers in place;
    None where the fused step does not run (see the module doc): the caller runs the blocks."""
    B, T, H = x.shape
    if (B * T > MAX_ROWS or x.device.type != "cpu" or torch.is_grad_enabled() or not enabled()
            or native.step_library() is None):
        return None
    p = plan(params, cfg)
    if p is None or H != p.hidden:
        return None
    layers = len(p.kv_heads)  # a cache may hold more layers (SelfDraft's share the target's): the first ones
    if len(cache.keys) < layers or len(cache.values) < layers:
        return None
    S, d = cache.max_len, p.head_dim
    for buffers in (cache.keys[:layers], cache.values[:layers]):
        for heads, buf in zip(p.kv_heads, buffers):
            if not (buf.dtype == p.dtype and buf.device.type == "cpu" and buf.shape == (B, heads, S, d)
                    and buf.is_contiguous()):
                return None
    pos = positions.to(torch.int64).contiguous()
    if pos.shape != (B, T):
        return None
    lo, hi = torch.aminmax(pos)
    if int(lo) < 0 or int(hi) >= min(S, p.positions):
        return None
    hidden = x.reshape(B * T, H).to(torch.float32, copy=True)
    keys = (ctypes.c_void_p * layers)(*[k.data_ptr() for k in cache.keys[:layers]])
    values = (ctypes.c_void_p * layers)(*[v.data_ptr() for v in cache.values[:layers]])
    if native.step_library().pangu_step(ctypes.byref(p.model), hidden.data_ptr(), pos.data_ptr(), T, B * T, keys,
                                        values, S, torch.get_num_threads()) != 0:
        return None  # out of memory in C: the PyTorch blocks rewrite the same cache slots
    return hidden.view(B, T, H).to(x.dtype)
