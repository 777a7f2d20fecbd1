"""AOTInductor programs (`compile="aot"`): the prefill, the decode step and the plain forward
compiled ahead of time into packages on disk (`torch._inductor.aoti_compile_and_package`) and
loaded by later processes without recompiling (`torch._inductor.aoti_load_package`).

Weights are inputs of the programs, not constants baked into them: a package holds code only,
so its key is what that code depends on — the config, the tree's names, shapes, strides and
dtypes, the program and the shapes, strides and dtypes of its other inputs, the sources it
traces, torch's version and the CPU capability — and never the weight values (nothing to hash per load, one package serves
every checkpoint of that shape). The price is that inductor cannot fold or prepack weights.
Trees whose leaves are all tensors (fp32 / bf16 / fp16) are supported; quantized leaves are not.

The cache buffers are written in place by the programs (donated, as in `compiled`); lengths
come back as a new tensor.

Packages live in `$PANGU_FN_CACHE/aot` (default `~/.cache/pangu_fn/aot`) with the care
`native.py` takes for its library, since loading a package loads a shared library: the folder
is ours and mode 0700, and a package that is a link, not a regular file, another user's or
writable by others is never loaded (programs are then compiled into a private temporary
folder). A package is written under a temporary name and renamed, under a file lock so two
processes compile one shape once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import native
from .cache import KVCache
from .config import ModelConfig
from .errors import ConfigError
from .model import forward
from .params import Params
from .sampling import greedy_tokens
from .tree import leaves_with_names

# The sources a traced program depends on: the math, the kernel choices under tracing, the config,
# cache and sampling types, and this file.
TRACED_SOURCES = ("aot.py", "backend.py", "cache.py", "config.py", "layers.py", "model.py", "params.py", "sampling.py")


@functools.cache
def _source_hash() -> str:
    """Hash of `TRACED_SOURCES`."""
    h = hashlib.sha256()
    for name in TRACED_SOURCES:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def package_key(cfg: ModelConfig, params: Params, name: str, inputs: list[torch.Tensor]) -> str:
    """The cache key of program `name` for this config, tree layout and input shapes (see the
    module docstring). Raises ConfigError for a tree with a leaf that is not a tensor."""
    layout = []
    for leaf_name, leaf in leaves_with_names(params):
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(f"compile='aot': expected a tree of tensors (fp32 / bf16 / fp16), "
                              f"found a {type(leaf).__name__} at {leaf_name}")
        layout.append(f"{leaf_name}:{leaf.dtype}:{tuple(leaf.shape)}:{leaf.stride()}")
    shapes = [f"{t.dtype}:{tuple(t.shape)}:{t.stride()}" for t in inputs]  # compiled code assumes the strides
    parts = [repr(cfg), *layout, name, *shapes, _source_hash(), torch.__version__,
             torch.backends.cpu.get_cpu_capability()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _folder() -> tuple[Path, bool]:
    """(where packages go, whether it is the shared cache): the `aot` subfolder of native.py's
    cache folder when that is usable and the subfolder is a real folder of ours (tightened to
    mode 0700), else a fresh private temporary folder."""
    cache = native._cache_folder()
    if cache is not None:
        folder = cache / "aot"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            info = folder.lstat()
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
                if stat.S_IMODE(info.st_mode) != 0o700:
                    folder.chmod(0o700)
                return folder, True
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="pangu_fn-aot-")), False


class _Step(torch.nn.Module):
    """Program `name` over flat inputs (weights, tokens, keys, values, lengths, *rest), for
    torch.export: rebuilds the tree and the cache, returns (outputs..., new lengths)."""

    def __init__(self, cfg: ModelConfig, spec: pytree.TreeSpec, name: str) -> None:
        super().__init__()
        self.cfg, self.spec, self.name = cfg, spec, name

    def forward(self, weights: list[torch.Tensor], tokens: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], lengths: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = pytree.tree_unflatten(weights, self.spec)
        cache = KVCache(keys, values, lengths)
        if self.name == "prefill":
            logits, cache = forward(params, self.cfg, tokens, cache, logits_index=rest[0])
            return logits[:, 0], cache.lengths
        if self.name == "decode":
            logits, cache = forward(params, self.cfg, tokens[:, None], cache)
            last = logits[:, -1]
            return last, greedy_tokens(last), cache.lengths
        logits, cache = forward(params, self.cfg, tokens, cache)
        return logits, cache.lengths


def _compile(step: _Step, params: Params, args: tuple[Any, ...], path: Path) -> None:
    """Export `step` on stand-ins of the weights and inputs (made outside inference mode and
    never written: no weight memory is read or doubled), compile it to a package under a
    temporary name beside `path`, then rename it to `path` (mode 0600)."""
    with torch.inference_mode(False):
        like = pytree.tree_map(torch.empty_like, (pytree.tree_leaves(params), *args))
        program = torch.export.export(step, like, strict=False)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class AotPrograms:
    """`compiled.Programs`' interface (prefill, decode, forward, init_cache, compile_s) over
    AOTInductor packages: per program and input shapes, loaded from the disk cache or exported,
    compiled and stored there first. `compile_s` counts export + compile + load seconds."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        if device.type != "cpu":
            raise ConfigError(f"compile='aot': expected a CPU model, found one on {device}")
        self.cfg, self.device = cfg, device
        self.compile_s = 0.0
        self.loaded: dict[tuple[int, str, tuple[Any, ...]], Callable[..., Any]] = {}
        self.events: list[tuple[str, str, float]] = []  # (program, "loaded" | "compiled", seconds)

    def _run(self, name: str, params: Params, tokens: torch.Tensor, cache: KVCache,
             *rest: torch.Tensor) -> tuple[Any, KVCache]:
        weights = pytree.tree_leaves(params)
        args = (tokens, cache.keys, cache.values, cache.lengths, *rest)
        key = (id(params), name, tuple((t.dtype, tuple(t.shape), t.stride()) for t in pytree.tree_leaves(args)))
        program = self.loaded.get(key)
        if program is None:
            start = time.perf_counter()
            program, how = self._load_or_compile(name, params, args)
            self.loaded[key] = program
            seconds = time.perf_counter() - start
            self.compile_s += seconds
            self.events.append((name, how, round(seconds, 2)))
        *out, lengths = program(weights, *args)
        return out, KVCache(cache.keys, cache.values, lengths)

    def _load_or_compile(self, name: str, params: Params, args: tuple[Any, ...]) -> tuple[Callable[..., Any], str]:
        """The loaded package of program `name` for these inputs, and "loaded" or "compiled"."""
        folder, shared = _folder()
        path = folder / f"{name}-{package_key(self.cfg, params, name, pytree.tree_leaves(args))}.pt2"
        if shared:
            with native._locked(folder / "aot.lock"):
                if path.exists() or path.is_symlink():
                    if native._untrusted(path) is None:
                        return torch._inductor.aoti_load_package(str(path)), "loaded"
                    path = Path(tempfile.mkdtemp(prefix="pangu_fn-aot-")) / path.name
                _compile(_Step(self.cfg, pytree.tree_structure(params), name), params, args, path)
        else:
            _compile(_Step(self.cfg, pytree.tree_structure(params), name), params, args, path)
        return torch._inductor.aoti_load_package(str(path)), "compiled"

    def init_cache(self, params: Params, batch_size: int, needed: int) -> KVCache:
        """A fresh static cache for `needed` positions (`compiled.static_cache`)."""
        from .compiled import CompileOptions, static_cache

        return static_cache(params, self.cfg, batch_size, needed, CompileOptions("aot"))

    def prefill(self, params: Params, tokens: torch.Tensor, cache: KVCache,
                last: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """As `compiled.Programs.prefill`."""
        (logits,), cache = self._run("prefill", params, tokens, cache, last)
        return logits, cache

    def decode(self, params: Params, tokens: torch.Tensor,
               cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """As `compiled.Programs.decode`."""
        (logits, token), cache = self._run("decode", params, tokens, cache)
        return logits, token, cache

    def forward(self, params: Params, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """As `compiled.Programs.forward`."""
        (logits,), cache = self._run("forward", params, tokens, cache)
        return logits, cache
