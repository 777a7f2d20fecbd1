"""Target torch: `forward` as a torch.export program (`model.pt2`) and a small loader.

The program is `forward(params, cfg, tokens, cache)` with the params as buffers: inputs
`tokens [B, T]` and a `KVCache` (static buffers `[B, Hkv, S, D]` and lengths `[B]`), outputs
`(logits [B, T, V], cache)`. Batch, sequence and cache length are dynamic. As in `forward`,
the cache buffers are written in place.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from pangu_fn.cache import KVCache, init_cache
from pangu_fn.config import ModelConfig
from pangu_fn.errors import FormatError
from pangu_fn.params import Params

from .graph import CacheDecoder
from .onnx_export import _quiet


def export_pt2(params: Params, cfg: ModelConfig, path: Path) -> None:
    """Write `path` (a .pt2 archive) holding `forward` traced with torch.export."""
    batch = torch.export.Dim("batch_size", min=1, max=1024)
    seq = torch.export.Dim("sequence_length", min=1, max=cfg.max_seq_len)
    max_len = torch.export.Dim("cache_length", min=2, max=cfg.max_seq_len)
    cache = init_cache(params, cfg, 2, 8)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    buf = {0: batch, 2: max_len}
    shapes = {"tokens": {0: batch, 1: seq}, "keys": [buf] * len(cache.keys), "values": [buf] * len(cache.values),
              "lengths": {0: batch}}
    with _quiet():
        program = torch.export.export(CacheDecoder(params, cfg).eval(),
                                      (tokens, cache.keys, cache.values, cache.lengths), dynamic_shapes=shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


class Program:
    """A loaded .pt2 program: `program(tokens, cache) -> (logits, cache)` with `forward`'s
    contract (the cache buffers are written in place), plus `new_cache(batch, max_len)`."""

    def __init__(self, module: torch.nn.Module, cfg: ModelConfig, manifest: dict[str, Any]) -> None:
        self.module, self.config, self.manifest = module, cfg, manifest

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        logits, keys, values, lengths = self.module(tokens, cache.keys, cache.values, cache.lengths)
        return logits, KVCache(keys, values, lengths)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.manifest["cache"]
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[c["dtype"]]
        shapes = [(batch_size, h, max_len, c["head_dim"]) for h in c["kv_heads"]]
        return KVCache([torch.zeros(s, dtype=dtype) for s in shapes], [torch.zeros(s, dtype=dtype) for s in shapes],
                       torch.zeros(batch_size, dtype=torch.int64))


def load_program(bundle: str | Path) -> Program:
    """Load a target-torch bundle: validates the manifest (version, paths, hashes), refuses
    archives holding pickled entries (only raw tensor bytes are accepted), then
    `torch.export.load`. Raises FormatError (or a pangu_runtime BundleError)."""
    from pangu_runtime.manifest import load_manifest, safe_path

    manifest = load_manifest(bundle)
    if manifest["target"] != "torch":
        raise FormatError(f"{bundle}: expected a target-torch bundle, found target {manifest['target']!r}")
    path = safe_path(Path(bundle), manifest["model"]["file"])
    _refuse_pickles(path)
    if manifest.get("quantization"):
        import pangu_fn.quant  # noqa: F401  (registers the torch.ops.pangu kernels the graph calls)
    with _quiet():
        program = torch.export.load(str(path))
    return Program(program.module(), ModelConfig.from_dict(manifest["config"]), manifest)


def _refuse_pickles(path: Path) -> None:
    """torch.export.load unpickles weight / constant entries flagged `use_pickle`, custom and
    opaque objects, and falls back to unpickling sample inputs that `weights_only` loading
    rejects. Our archives hold only raw tensor bytes, so an archive with any of those is
    refused before torch.export.load sees it."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    try:
                        entries = json.loads(z.read(name)).get("config", {})
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise FormatError(f"{path}: {name} is not a valid config: {e}") from None
                    for key, entry in entries.items():
                        if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(
                                ("weight_", "tensor_")):
                            raise FormatError(f"{path}: entry {key!r} in {name} is a pickled object; "
                                              "refusing to unpickle it")
                elif "/sample_inputs/" in name:
                    try:
                        torch.load(io.BytesIO(z.read(name)), weights_only=True)
                    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ...)
                        raise FormatError(f"{path}: {name} needs full unpickling ({type(e).__name__}); "
                                          "refusing to load it") from None
    except zipfile.BadZipFile as e:
        raise FormatError(f"{path}: not a .pt2 archive: {e}") from None
