"""Read-only access to the tensors of a safetensors file or a sharded folder (with a
`*.safetensors.index.json`), one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import FormatError


class TensorStore:
    """Names -> tensors across one or more safetensors files; tensors load lazily."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._file_of = files  # tensor name -> file
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> "TensorStore":
        """A `.safetensors` file, or a folder holding one, or an index plus its shards."""
        path = Path(path)
        if path.is_file():
            return cls({name: path for name in _keys(path)})
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{indexes[0]}: expected a JSON object with a weight_map, found {e}") from None
            files = {}
            for name, shard in weight_map.items():
                shard_path = (path / shard).resolve()
                if path.resolve() not in shard_path.parents or not shard_path.is_file():
                    raise FormatError(f"{indexes[0]}: tensor {name} points to {shard!r}, not a file in {path}")
                files[name] = shard_path
            return cls(files)
        singles = sorted(path.glob("*.safetensors"))
        if not singles:
            raise FormatError(f"{path}: expected a .safetensors file or an index, found none")
        files = {}
        for f in singles:
            for name in _keys(f):
                if name in files:
                    raise FormatError(f"{path}: tensor {name} appears in both {files[name].name} and {f.name}")
                files[name] = f
        return cls(files)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise FormatError(f"missing tensor {name!r}")
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = _open(f)
        try:
            return self._handles[f].get_tensor(name)  # type: ignore[attr-defined]
        except SafetensorError as e:
            raise FormatError(f"{f}: tensor {name}: {e}") from None

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first file (our writer repeats it in every shard)."""
        first = next(iter(self._file_of.values()), None)
        if first is None:
            return {}
        return _open(first).metadata() or {}

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._file_of:
            yield name, self.get(name)


def _open(path: Path) -> object:
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: not a readable safetensors file: {e}") from None


def _keys(path: Path) -> list[str]:
    return list(_open(path).keys())  # type: ignore[attr-defined]
