"""manifest.json: the description of a bundle, and its validation before anything is loaded.

A bundle folder holds `manifest.json` beside the model file(s) and the tokenizer. The
manifest records the format version, the target, the model config, the graph's I/O names,
the KV-cache layout, dtypes, quantization, generation defaults, the opset and the sha256
of every file. `load_manifest` refuses a bundle from a newer format version, a field of the
wrong type or out of range (every field the runtime reads is checked here, so a hostile
manifest raises a BundleError and nothing else), a file path that is absolute or leaves the
folder, a missing file, or a file whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleFileError, BundleFormatError, BundleHashError, BundlePathError, BundleVersionError

FORMAT = "pangu-bundle"
VERSION = 1
MANIFEST = "manifest.json"
TARGETS = ("ort", "ascend", "torch")
LAYOUTS = ("growing", "static", "inplace")
TOKENIZER_KINDS = ("sentencepiece", "pangu-alpha", "tokenizers")
MAX_MANIFEST = 10_000_000  # bytes
MAX_DIM = 2**31 - 1  # sizes (vocabulary, context, heads, head size, batch) must fit in int32


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
    if not parts.parts or parts.parts == (".",) or name.endswith("/"):
        raise BundlePathError(f"{bundle / MANIFEST}: expected a file name, found {name!r} (a folder)")
    if parts.is_absolute() or ".." in parts.parts or ":" in parts.parts[0]:
        raise BundlePathError(f"{bundle / MANIFEST}: file {name!r} is outside the bundle folder "
                              "(absolute or containing '..')")
    path = bundle / name
    try:
        root, real = bundle.resolve(), path.resolve()
        exists = path.exists()
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
        raise BundlePathError(f"{bundle / MANIFEST}: file {name[:120]!r} cannot be looked up: {e}") from None
    if exists and not real.is_relative_to(root):
        raise BundlePathError(f"{bundle / MANIFEST}: file {name!r} resolves to {real}, "
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
    if f.stat().st_size > MAX_MANIFEST:
        raise BundleFormatError(f"{f}: {f.stat().st_size} bytes; expected a manifest of at most {MAX_MANIFEST}")
    try:
        m = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:  # JSONDecodeError is a ValueError
        raise BundleFormatError(f"{f}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise BundleFormatError(f"{f}: expected format {FORMAT!r}, found {found!r}")
    version = m.get("version")
    if type(version) is not int or version < 1:
        raise BundleFormatError(f"{f}: expected an integer format version >= 1, found {version!r}")
    if version > VERSION:
        raise BundleVersionError(f"{f}: format version {version} was written by a newer pangu-fn; "
                                 f"this runtime reads versions up to {VERSION}")
    for key, kind in (("target", str), ("config", dict), ("model", dict), ("cache", dict), ("files", dict)):
        if not isinstance(m.get(key), kind):
            raise BundleFormatError(f"{f}: expected {key!r} to be a {kind.__name__}, found {m.get(key)!r}")
    if m["target"] not in TARGETS:
        raise BundleFormatError(f"{f}: unknown target {m['target']!r}; expected one of {TARGETS}")
    check_fields(m, f)

    for name, entry in m["files"].items():
        path = safe_path(bundle, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or \
                not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
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


def check_fields(m: dict[str, Any], f: Path) -> None:
    """Raise BundleFormatError unless every field the runtime reads has its type and range:
    model (file, external_data, accuracy_level), inputs / outputs, config (vocab_size,
    max_seq_len), cache (layout, dtype, blocks, kv_heads, head_dim; batch_size and max_len of
    a static cache), tokenizer, generation and ascend."""
    def need(ok: bool, field: str, expected: str, found: Any) -> None:
        if not ok:
            raise BundleFormatError(f"{f}: {field}: expected {expected}, found {str(found)[:120]}")

    def size(value: Any) -> bool:
        return type(value) is int and 1 <= value <= MAX_DIM

    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(n, str) for n in value)

    def ids(value: Any) -> bool:
        return value is None or (type(value) is int and 0 <= value <= MAX_DIM)

    model, config, cache = m["model"], m["config"], m["cache"]
    need(isinstance(model.get("file"), str), "model.file", "a file name", model.get("file"))
    need(names(model.get("external_data", [])), "model.external_data", "a list of file names",
         model.get("external_data"))
    need(model.get("accuracy_level", 0) in (0, 1, 2, 3, 4) and type(model.get("accuracy_level", 0)) is int,
         "model.accuracy_level", "an integer 0..4", model.get("accuracy_level"))
    for key in ("inputs", "outputs"):
        need(names(m.get(key)), key, "a list of tensor names", m.get(key))
    for key in ("vocab_size", "max_seq_len"):
        need(size(config.get(key)), f"config.{key}", f"an integer in [1, {MAX_DIM}]", config.get(key))
    need(cache.get("layout") in LAYOUTS, "cache.layout", f"one of {LAYOUTS}", cache.get("layout"))
    need(isinstance(cache.get("dtype"), str), "cache.dtype", "a dtype name", cache.get("dtype"))
    need(size(cache.get("head_dim")), "cache.head_dim", f"an integer in [1, {MAX_DIM}]", cache.get("head_dim"))
    heads = cache.get("kv_heads")
    need(isinstance(heads, list) and all(size(h) for h in heads) and cache.get("blocks") == len(heads) > 0,
         "cache.kv_heads", "one positive head count per block (cache.blocks of them)", heads)
    need(isinstance(cache.get("share_buffer", False), bool), "cache.share_buffer", "a boolean",
         cache.get("share_buffer"))
    if cache["layout"] == "static":
        for key in ("batch_size", "max_len"):
            need(size(cache.get(key)), f"cache.{key}", f"an integer in [1, {MAX_DIM}]", cache.get(key))
    tok = m.get("tokenizer")
    need(tok is None or isinstance(tok, dict), "tokenizer", "an object or null", tok)
    if tok is not None:
        need(isinstance(tok.get("file"), str), "tokenizer.file", "a file name", tok.get("file"))
        need(tok.get("kind") in TOKENIZER_KINDS, "tokenizer.kind", f"one of {TOKENIZER_KINDS}", tok.get("kind"))
        need(names(tok.get("extra_files", [])), "tokenizer.extra_files", "a list of file names",
             tok.get("extra_files"))
        for key in ("bos_id", "eos_id", "pad_id"):
            need(ids(tok.get(key)), f"tokenizer.{key}", "a token id or null", tok.get(key))
    gen = m.get("generation")
    need(gen is None or isinstance(gen, dict), "generation", "an object or null", gen)
    if gen:
        eos = gen.get("eos_token_ids", [])
        need(isinstance(eos, list) and all(ids(t) and t is not None for t in eos), "generation.eos_token_ids",
             "a list of token ids", eos)
    ascend = m.get("ascend")
    need(ascend is None or isinstance(ascend, dict), "ascend", "an object", ascend)
    if ascend is not None:
        lengths = ascend.get("prefill_lengths")
        need(lengths is None or (isinstance(lengths, list) and lengths and all(size(n) for n in lengths)),
             "ascend.prefill_lengths", "a non-empty list of positive lengths", lengths)
