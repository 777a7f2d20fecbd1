"""Compiled decoding: the prefill and the decode step as `torch.compile` programs, compiled once
per shape and replayed.

The programs trace `model.forward` itself (rule 1): under tracing (`backend.tracing()`) it takes
positions and the attention mask from the cache's `lengths` tensor and writes keys and values by
scatter, so one program serves every step of a batch whatever each row's length. The KV cache
buffers are static (`[B, H_kv, S, D]`, S a bucket: `cache_len`), prompts are right-padded to a
bucket (`prefill_len`), and the decode step returns the greedy token with the logits, so a
greedy `generate` reads nothing back from the device until its stop check (every
`STOP_CHECK_EVERY` steps). Shapes that differ (batch size, cache bucket, prompt bucket, a
speculative verification's length) each compile once; `torch.compile`'s FX graph cache keeps
inductor's output on disk across processes.

On CUDA inductor runs with CUDA graphs (`mode="reduce-overhead"`; weights and cache buffers are
marked static so a replay copies nothing); on the CPU with its C++ wrapper (`cpp_wrapper`); on
Ascend NPUs TorchAir's backend takes inductor's place (`npu_backend`, untested).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from .cache import KVCache, init_cache
from .config import ModelConfig
from .errors import ConfigError
from .model import forward
from .params import Params
from .sampling import greedy_tokens

# Greedy generate() asks the device whether every row has stopped once per this many steps.
STOP_CHECK_EVERY = 16
BACKENDS = ("inductor", "aot", "aot_eager", "eager")
# Compiled shapes per program (torch's default, 8, fails a fullgraph program on the ninth
# batch size / bucket / model of a process).
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: a `torch.compile` backend ("inductor"; "aot_eager" / "eager" trace the
    same graphs without generating code, for tests), or "aot": AOTInductor packages cached on
    disk across processes (CPU, trees of tensors; `pangu_fn.aot`), and inductor's `mode`
    (None: CUDA graphs on CUDA, the default elsewhere)."""

    backend: str = "inductor"
    mode: str | None = None
    cpp_wrapper: bool = True  # inductor on the CPU: C++ wrapper code (False: Python's)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"compile: expected a backend in {BACKENDS}, found {self.backend!r}")


def options(compile: bool | str | CompileOptions) -> CompileOptions | None:
    """The options a `compile=` argument means: False -> None (eager), True -> inductor, a
    backend name, or CompileOptions as given. Raises ConfigError for anything else."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return CompileOptions()
    if isinstance(compile, str):
        return CompileOptions(backend=compile)
    if isinstance(compile, CompileOptions):
        return compile
    raise ConfigError(f"compile: expected a bool, a backend name or CompileOptions, found {compile!r:.60}")


def npu_backend(mode: str | None) -> Any:
    """TorchAir's graph backend for Ascend NPUs, standing in for inductor there: `mode`
    "reduce-overhead" (the default here: captured graphs replayed, as CUDA graphs on CUDA) or
    "max-autotune" (TorchAir's default, GE graph compilation). Written from the TorchAir user
    guide (`torchair.CompilerConfig`, `torchair.get_npu_backend`); untested: no NPU was
    available. torch_npu is imported first, as TorchAir requires."""
    import torch_npu  # noqa: F401  (registers the NPU device before TorchAir loads)
    import torchair

    config = torchair.CompilerConfig()
    config.mode = mode or "reduce-overhead"
    return torchair.get_npu_backend(compiler_config=config)


def _bucket(n: int, cap: int, least: int = 16) -> int:
    """The smallest power of two >= max(n, least), at most `cap` (n <= cap)."""
    b = least
    while b < n:
        b *= 2
    return min(b, cap)


def cache_len(cfg: ModelConfig, needed: int) -> int:
    """The static cache length (a bucket) for `needed` positions."""
    return _bucket(needed, cfg.max_seq_len, 64)


def prefill_len(prompt_len: int, cache_positions: int) -> int:
    """The padded length (a bucket) a prompt of `prompt_len` tokens is prefilled at."""
    return _bucket(prompt_len, cache_positions)


class Programs:
    """The compiled prefill, decode step and plain forward of one (cfg, options); each
    `torch.compile`d once with `fullgraph=True` and specialized per input shape."""

    def __init__(self, cfg: ModelConfig, opts: CompileOptions, device: torch.device) -> None:
        self.cfg, self.opts, self.device = cfg, opts, device
        self.compile_s = 0.0  # seconds of the first call of each new shape (tracing + codegen)
        self._seen: set[tuple[Any, ...]] = set()
        kw: dict[str, Any] = {"backend": opts.backend, "fullgraph": True, "dynamic": False}
        if opts.backend == "inductor" and device.type == "npu":
            kw["backend"] = npu_backend(opts.mode)
        elif opts.backend == "inductor":
            if device.type == "cuda":
                kw["mode"] = opts.mode or "reduce-overhead"
            elif opts.mode:
                kw["mode"] = opts.mode
            if device.type == "cpu":
                kw["options"] = {"cpp_wrapper": opts.cpp_wrapper}
        self._prefill = torch.compile(self._prefill_fn, **kw)
        self._decode = torch.compile(self._decode_fn, **kw)
        self._forward = torch.compile(self._forward_fn, **kw)

    def _prefill_fn(self, params: Params, tokens: torch.Tensor, cache: KVCache,
                    last: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        logits, cache = forward(params, self.cfg, tokens, cache, logits_index=last)
        return logits[:, 0], cache

    def _decode_fn(self, params: Params, tokens: torch.Tensor,
                   cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        logits, cache = forward(params, self.cfg, tokens[:, None], cache)
        last = logits[:, -1]
        return last, greedy_tokens(last), cache

    def _forward_fn(self, params: Params, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        logits, cache = forward(params, self.cfg, tokens, cache)
        return logits, cache

    def _timed(self, name: str, fn: Callable[..., Any], params: Params, tokens: torch.Tensor, cache: KVCache,
               *rest: Any) -> Any:
        """`fn(params, tokens, cache, *rest)`; a first call for this tree and these shapes (which
        may compile) is timed into `compile_s` and may exceed torch's recompile limit."""
        key = (name, id(params), tuple(tokens.shape), tuple(cache.keys[0].shape))
        args = (params, tokens, cache, *rest)
        if key in self._seen:
            return fn(*args)
        start = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):  # a new shape compiles
            out = fn(*args)
        self.compile_s += time.perf_counter() - start
        self._seen.add(key)
        return out

    def prefill(self, params: Params, tokens: torch.Tensor, cache: KVCache,
                last: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Logits `[B, V]` of token `last[b]` of each row of `tokens [B, T]` (T a bucket),
        written into the fresh `cache` (donated; returned with lengths T)."""
        return self._timed("prefill", self._prefill, params, tokens, cache, last)

    def decode(self, params: Params, tokens: torch.Tensor,
               cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """One step: `tokens [B]` at each row's length -> (logits `[B, V]`, greedy tokens `[B]`,
        the cache with lengths + 1). Donates the cache."""
        return self._timed("decode", self._decode, params, tokens, cache)

    def init_cache(self, params: Params, batch_size: int, needed: int) -> KVCache:
        """A fresh static cache for `needed` positions (see `static_cache`)."""
        return static_cache(params, self.cfg, batch_size, needed, self.opts)

    def forward(self, params: Params, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """`model.forward(params, cfg, tokens, cache)` compiled per shape (speculative verification)."""
        return self._timed("forward", self._forward, params, tokens, cache)


_PROGRAMS: dict[tuple[ModelConfig, CompileOptions, torch.device], Any] = {}


def programs(params: Params, cfg: ModelConfig, opts: CompileOptions) -> Programs:
    """The Programs of (cfg, opts) on the params' device, made once per process (the same
    Python functions, so torch.compile's caches are reused across calls; for "aot",
    `aot.AotPrograms`, the same interface). On CUDA with CUDA graphs the params' tensors are
    marked as static addresses. Raises ConfigError for "aot" off the CPU."""
    device = params["tok_embed"]["weight"].device
    if opts.backend == "aot":
        from .aot import AotPrograms

        key = (cfg, opts, device)
        if key not in _PROGRAMS:
            _PROGRAMS[key] = AotPrograms(cfg, device)
        return _PROGRAMS[key]
    if device.type == "cuda":
        for leaf in pytree.tree_leaves(params):
            getattr(leaf, "cuda_kernel_data", None)  # int4 leaves build their tinygemm pack now, not in a trace
            if opts.backend == "inductor":
                for t in _tensors(leaf):
                    torch._dynamo.mark_static_address(t)
    key = (cfg, opts, device)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = Programs(cfg, opts, device)
    return _PROGRAMS[key]


def _tensors(leaf: Any) -> list[torch.Tensor]:
    """The tensors a leaf holds: itself, or those among a quantized leaf's attributes (kernel
    copies included)."""
    if isinstance(leaf, torch.Tensor):
        return [leaf]
    return [t for t in pytree.tree_leaves(vars(leaf)) if isinstance(t, torch.Tensor)] if hasattr(leaf, "__dict__") else []


def static_cache(params: Params, cfg: ModelConfig, batch_size: int, needed: int, opts: CompileOptions) -> KVCache:
    """`init_cache` at the bucketed length for `needed` positions; on CUDA with CUDA graphs its
    buffers are marked static (the step writes them in place)."""
    cache = init_cache(params, cfg, batch_size, cache_len(cfg, needed))
    if cache.lengths.device.type == "cuda" and opts.backend == "inductor":
        for buf in (*cache.keys, *cache.values):
            torch._dynamo.mark_static_address(buf)
    return cache


def prefill(progs: Programs, params: Params, prompts: Sequence[Sequence[int]],
            cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """Right-pad `prompts` to their bucket, prefill them into `cache` (donated) and set each
    row's length to its prompt's: (logits `[B, V]` of each prompt's last token, cache)."""
    device = cache.lengths.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = prefill_len(max(len(p) for p in prompts), cache.max_len)
    tokens = torch.zeros(len(prompts), T, dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    logits, cache = progs.prefill(params, tokens, cache, lengths - 1)
    return logits, cache.with_lengths(lengths)


def greedy_generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos: Iterable[int], opts: CompileOptions) -> list[tuple[list[int], str]]:
    """Greedy decoding of checked `prompts` through the compiled programs, with no read-back
    per token: tokens stay on the device and the stop check (every row past an eos) runs every
    `STOP_CHECK_EVERY` steps. Returns (new tokens, "eos" | "length") per prompt."""
    progs = programs(params, cfg, opts)
    B = len(prompts)
    with torch.inference_mode():
        cache = static_cache(params, cfg, B, max(len(p) for p in prompts) + max_new_tokens, opts)
        logits, cache = prefill(progs, params, prompts, cache)
        device = logits.device
        eos_t = torch.tensor(sorted(set(eos)), dtype=torch.int64, device=device)
        out = torch.empty(B, max_new_tokens, dtype=torch.int64, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        token = greedy_tokens(logits)
        for step in range(max_new_tokens):
            out[:, step] = token
            done |= torch.isin(token, eos_t)
            if step == max_new_tokens - 1 or ((step + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())):
                break
            _, token, cache = progs.decode(params, token, cache)
        rows = out[:, : step + 1].tolist()
    eos_set = set(eos_t.tolist())
    result = []
    for row in rows:
        stop = next((i for i, t in enumerate(row) if t in eos_set), None)
        result.append((row[: stop + 1], "eos") if stop is not None else (row, "length"))
    return result
