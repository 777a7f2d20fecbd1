"""Where a writer may write: the rules that keep `save`, `convert`, `quantize`, `prune` and
`export` from destroying data.

A destination that exists and is not an empty folder is replaced only with `overwrite=True`
(`--overwrite`), and only when it is one of ours: a model folder (`config.json` written by
pangu-fn or a Hugging Face / gpt_pangu `config.json`), a bundle (`manifest.json` of format
pangu-bundle) or a single checkpoint file. A destination that equals or contains a source
(symlinks resolved) is always refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError

BUNDLE_FORMAT = "pangu-bundle"  # pangu_runtime.manifest.FORMAT (pangu_fn cannot import the runtime)
MODEL_FORMAT = "pangu-fn"


def check_destination(dst: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> None:
    """Raise ConfigError unless writing `dst` (a folder, or a file for a single-file format)
    loses nothing: `dst` must not equal or contain any of `sources`; an existing `dst` other
    than an empty folder needs `overwrite`, and a folder then must be one of ours."""
    dst = Path(dst)
    target = dst.resolve()
    for src in sources:
        src_path = Path(src).resolve()
        if target == src_path or target in src_path.parents:
            what = "is" if target == src_path else "contains"
            raise ConfigError(f"destination {dst} {what} the source {src}; write to a new path")
    if not (dst.exists() or dst.is_symlink()):
        return
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"destination {dst} exists; pass --overwrite (overwrite=True) to replace it")
    if dst.is_dir() and not is_ours(dst):
        raise ConfigError(f"destination {dst} is a folder without a pangu-fn config.json or bundle manifest.json "
                          f"(found {sorted(p.name for p in dst.iterdir())[:5]}); refusing to replace it even with "
                          "--overwrite: remove it yourself or choose another path")


def is_ours(folder: Path) -> bool:
    """Whether `folder` holds a model (our config.json, or a Hugging Face / gpt_pangu one as our
    writers make) or a bundle (manifest.json of format pangu-bundle)."""
    config, manifest = _json_object(folder / "config.json"), _json_object(folder / "manifest.json")
    return (config.get("format") == MODEL_FORMAT or isinstance(config.get("model_type"), str)
            or manifest.get("format") == BUNDLE_FORMAT)


def _json_object(path: Path) -> dict:
    try:
        d = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 10**7 else {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}
