"""A checkpoint opened for reading: its ModelConfig and a lazy reference to every tensor
under our flat names (see `params.py`), before any tensor byte is read.

Every layout (ours, Hugging Face, gpt_pangu, MindSpore, Megatron, seed `.pt`) opens into a
`Source`; `load` materialises one, and `convert` streams one tensor at a time from it into a
writer, so converting costs about one tensor of memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, FormatError

CHUNK_BYTES = 4 * 1024**2
MAX_INDEX = 100_000_000  # bytes of a *.index.json


@dataclass(frozen=True)
class TensorRef:
    """A tensor not yet read: its shape and dtype in our layout, and how to read it (the
    result may be a view, e.g. the transpose of a stored `[in, out]` matrix). `read_rows(a, b)`,
    where the file allows it, reads only rows `a:b` (loading lays large matrices out slab by slab);
    `read_part(dim, a, b)`, where the file allows it, only rows or columns `a:b` of a 1-D or
    2-D tensor (a tensor-parallel rank's slice)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    read_rows: Callable[[int, int], torch.Tensor] | None = None
    read_part: Callable[[int, int, int], torch.Tensor] | None = None  # (dim, start, stop), reading only that

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def transposed(self) -> TensorRef:
        part = self.read_part
        return TensorRef(self.shape[::-1], self.dtype, lambda: self.read().t(),
                         read_part=None if part is None else lambda dim, a, b: part(1 - dim, a, b).t().contiguous())

    @staticmethod
    def of(t: torch.Tensor) -> TensorRef:
        return TensorRef(tuple(t.shape), t.dtype, lambda: t)


@dataclass
class Source:
    """What `load`/`convert` read from: config, our flat names -> TensorRef, the source's
    entries deliberately left out (optimizer state, buffers), quantized-leaf descriptions
    (our format only), the folder where a tokenizer may sit, and notes for the user (what
    was assumed because the checkpoint does not store it, e.g. a MindSpore model's activation)."""

    path: Path
    layout: str
    cfg: ModelConfig
    tensors: dict[str, TensorRef]
    skipped: list[str] = field(default_factory=list)
    leaves: dict[str, dict[str, Any]] = field(default_factory=dict)
    folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor read (contiguous), by flat name."""
        return {name: ref.read().contiguous() for name, ref in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors.values())


def tensor_chunks(t: torch.Tensor, dtype: torch.dtype | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The C-order bytes of `t` (cast to `dtype` if given), as memoryviews of at most about
    `chunk_bytes`: a contiguous tensor is not copied, a view (a transpose) or a cast is
    materialised one slab of rows at a time."""
    dtype = dtype or t.dtype
    t = t.detach().cpu()
    if t.numel() == 0:
        return
    if t.dim() == 0:
        t = t.reshape(1)
    if t.is_contiguous() and t.dtype == dtype:
        flat = t.reshape(-1).view(torch.uint8).numpy()
        for start in range(0, len(flat), chunk_bytes):
            yield memoryview(flat[start:start + chunk_bytes])
        return
    row_bytes = max(1, (t.numel() // t.shape[0]) * torch.empty((), dtype=dtype).element_size())
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, t.shape[0], step):
        slab = t[start:start + step].to(dtype).contiguous()
        yield memoryview(slab.reshape(-1).view(torch.uint8).numpy())


class WeightFiles:
    """The weight files of a model folder, whichever Hugging Face naming they use:
    `*.safetensors.index.json` or `pytorch_model.bin.index.json` plus shards, a single
    `*.safetensors`, or `pytorch_model.bin`. `.bin` files load with `weights_only=True`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        indexes = sorted(self.folder.glob("*.safetensors.index.json")) or sorted(self.folder.glob("*.bin.index.json"))
        if indexes:
            self._from_index(indexes[0])
        else:
            files = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))
            if not files:
                raise FormatError(f"{self.folder}: expected .safetensors or pytorch_model.bin weights "
                                  "(or an index of shards), found none")
            for f in files:
                for name in self._handle(f).keys():  # noqa: SIM118  (keys() only, not a mapping)
                    if name in self._file_of:
                        raise FormatError(f"{self.folder}: tensor {name} appears in both "
                                          f"{self._file_of[name].name} and {f.name}")
                    self._file_of[name] = f

    def _from_index(self, index: Path) -> None:
        """Read a shard index: a JSON object (at most MAX_INDEX bytes) whose weight_map maps
        tensor names to file names inside the folder (symlinks resolved)."""
        if index.stat().st_size > MAX_INDEX:
            raise FormatError(f"{index}: {index.stat().st_size} bytes; expected a shard index of at most "
                              f"{MAX_INDEX} bytes")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            items = list(weight_map.items())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: expected a JSON object with a weight_map object, found {e!r}"[:300]) from None
        root = self.folder.resolve()
        for name, shard in items:
            if not isinstance(shard, str) or not shard or "\x00" in shard:
                raise FormatError(f"{index}: tensor {name!r} points to {str(shard)[:80]!r}; expected a file name")
            try:
                path = (self.folder / shard).resolve()
                inside = root in path.parents and path.is_file()
            except (OSError, RuntimeError):  # a name too long, a symlink loop
                inside = False
            if not inside:
                raise FormatError(f"{index}: tensor {name!r} points to {shard!r}, not a file in {self.folder}")
            self._file_of[name] = path
        for path in set(self._file_of.values()):
            stored = set(self._handle(path).keys())
            listed = {n for n, p in self._file_of.items() if p == path}
            if listed - stored:
                raise FormatError(f"{index}: lists {sorted(listed - stored)[:5]} in {path.name}, which lacks them")

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            if path.suffix == ".safetensors":
                from .safetensors_io import SafetensorsFile

                self._open[path] = SafetensorsFile(path)
            else:
                from .torch_pt import read_state_dict

                self._open[path] = _DictFile(read_state_dict(path))
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def ref(self, name: str) -> TensorRef:
        h = self._handle(self._file_of[name])
        if isinstance(h, _DictFile):
            return TensorRef.of(h.tensors[name])
        info = h.infos[name]
        return TensorRef(info.shape, info.dtype, lambda: h.get(name), lambda a, b: h.get_slice(name, 0, a, b))

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise FormatError(f"{self.folder}: missing tensor {name!r}")
        return self.ref(name).read()


class _DictFile:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)


# -- configs of layouts that store none -------------------------------------------------------

def config_from_shapes(family: str, shapes: dict[str, tuple[int, ...]], hint: ModelConfig | None,
                       known_heads: dict[int, int], source: str) -> ModelConfig:
    """A ModelConfig for flat `shapes` (our names, our layout) of a checkpoint that stores no
    config. Sizes come from the shapes (vocabulary, hidden, layers, FFN, positions, KV heads,
    biases, tied head); what shapes cannot tell (the head count, activation, epsilon, token ids,
    RoPE theta) comes from `hint`, else from `known_heads` (hidden size -> heads of the released
    models) and the family's defaults. Raises FormatError when the head count stays unknown."""
    from ..config import PRESETS

    if "tok_embed.weight" not in shapes:
        raise FormatError(f"{source}: no token embedding found")
    vocab, hidden = shapes["tok_embed.weight"]
    layers = 1 + max((int(n.split(".")[1]) for n in shapes if n.startswith("blocks.")), default=-1)
    if layers == 0:
        raise FormatError(f"{source}: no transformer blocks found")
    q_rows = shapes.get("blocks.0.attn.q.weight", (hidden,))[0]
    if hint is not None:
        heads = hint.num_heads if hint.hidden_size == hidden else q_rows // hint.head_dim
    elif hidden in known_heads:
        heads = known_heads[hidden]
    else:
        raise FormatError(f"{source}: the number of attention heads cannot be read from the shapes "
                          f"(hidden size {hidden}); put a config.json beside the checkpoint or pass a "
                          "config (pangu convert --config PRESET|config.json|run.yaml)")
    if heads <= 0 or q_rows % heads:
        raise ConfigError(f"{source}: {heads} heads do not divide the {q_rows} query rows of blocks.0.attn.q.weight")
    head_dim = q_rows // heads
    defaults = {"alpha": PRESETS["pangu-alpha-350m"], "gpt": PRESETS["pangu-1b"],
                "openpangu": PRESETS["openpangu-embedded-1b"]}[family]
    base = hint if hint is not None and hint.family == family else defaults
    if family == "openpangu" and (hint is None or hint.family != family):
        raise FormatError(f"{source}: a RoPE/SwiGLU (openPangu) state dict needs a config for RoPE theta and "
                          "epsilon; put a config.json beside it or pass --config")
    changes: dict[str, Any] = {
        "family": family, "vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
        "head_dim": head_dim, "num_kv_heads": shapes.get("blocks.0.attn.k.weight", (q_rows,))[0] // head_dim,
        "intermediate_size": shapes["blocks.0.mlp.up.weight"][0] if "blocks.0.mlp.up.weight" in shapes else hidden * 4,
        "query_layer": any(n.startswith("query_layer.") for n in shapes),
        "tie_embeddings": "lm_head.weight" not in shapes,
        "attn_bias": "blocks.0.attn.q.bias" in shapes, "mlp_bias": "blocks.0.mlp.up.bias" in shapes,
        "norm": "layernorm" if "final_norm.bias" in shapes else "rmsnorm"}
    if "pos_embed.weight" in shapes:
        changes["max_seq_len"] = shapes["pos_embed.weight"][0]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok = getattr(base, key)
        if tok is not None and tok >= vocab:
            changes[key] = None
    try:
        return base.replace(**changes)
    except ConfigError as e:
        raise FormatError(f"{source}: shapes give an inconsistent config: {e}") from None
