"""manifest.json: the description of a bundle, and its validation before anything is loaded.

A bundle folder holds `manifest.json` beside the model file(s) and the tokenizer. The
manifest records the format version, the target, the model config, the graph's I/O names,
the KV-cache layout, dtypes, quantization, generation defaults, the opset and the sha256
of every file. `load_manifest` refuses a bundle from a newer format version, a file path
that is absolute or leaves the folder, a missing file, or a file whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleFileError, BundleFormatError, BundleHashError, BundlePathError, BundleVersionError

FORMAT = "pangu-bundle"
VERSION = 1
MANIFEST = "manifest.json"
TARGETS = ("ort", "ascend", "torch")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_path(bundle: Path, name: Any) -> Path:
    """The file `name` (a relative POSIX path) inside `bundle`. Raises BundlePathError for an
    absolute path, a '..' part, a backslash, or a path (symlinks resolved) outside the folder."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundlePathError(f"{bundle / MANIFEST}: expected a relative file name, found {name!r}")
    parts = PurePosixPath(name)
    if parts.is_absolute() or ".." in parts.parts or ":" in parts.parts[0]:
        raise BundlePathError(f"{bundle / MANIFEST}: file {name!r} is outside the bundle folder "
                              "(absolute or containing '..')")
    path = bundle / name
    root = bundle.resolve()
    if path.exists() and not path.resolve().is_relative_to(root):
        raise BundlePathError(f"{bundle / MANIFEST}: file {name!r} resolves to {path.resolve()}, "
                              f"outside the bundle folder {root}")
    return path


def load_manifest(bundle: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """Read and validate `bundle/manifest.json`; returns it as a dict. Every file it lists
    must exist inside the folder with the recorded sha256 (skip the hashing with
    `verify_hashes=False`), and every file it refers to must be listed."""
    bundle = Path(bundle)
    f = bundle / MANIFEST
    if not f.is_file():
        raise BundleFormatError(f"{bundle}: expected a bundle folder with {MANIFEST}, found none")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleFormatError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise BundleFormatError(f"{f}: expected format {FORMAT!r}, found {found!r}")
    version = m.get("version")
    if not isinstance(version, int) or version < 1:
        raise BundleFormatError(f"{f}: expected an integer format version >= 1, found {version!r}")
    if version > VERSION:
        raise BundleVersionError(f"{f}: format version {version} was written by a newer pangu-fn; "
                                 f"this runtime reads versions up to {VERSION}")
    for key, kind in (("target", str), ("config", dict), ("model", dict), ("cache", dict), ("files", dict)):
        if not isinstance(m.get(key), kind):
            raise BundleFormatError(f"{f}: expected {key!r} to be a {kind.__name__}, found {m.get(key)!r}")
    if m["target"] not in TARGETS:
        raise BundleFormatError(f"{f}: unknown target {m['target']!r}; expected one of {TARGETS}")

    for name, entry in m["files"].items():
        path = safe_path(bundle, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleFormatError(f"{f}: file {name!r}: expected {{'sha256': hex, 'bytes': n}}, found {entry!r}")
        if not path.is_file():
            raise BundleFileError(f"{bundle}: file {name!r} listed in {MANIFEST} is missing")
        if verify_hashes:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise BundleHashError(f"{path}: sha256 {digest} differs from {entry['sha256']} "
                                      f"recorded in {MANIFEST}; the file was changed or corrupted")
    for name in referenced_files(m):
        safe_path(bundle, name)
        if name not in m["files"]:
            raise BundleFormatError(f"{f}: {name!r} is used but not listed (with its hash) under 'files'")
    return m


def referenced_files(m: dict[str, Any]) -> list[str]:
    """Every file the manifest points at (model, its external data, tokenizer files)."""
    names = [m["model"].get("file")] + list(m["model"].get("external_data", []))
    tok = m.get("tokenizer") or {}
    names += [tok.get("file")] + list(tok.get("extra_files", []))
    return [n for n in names if n is not None]
