"""The demo corpus: English text that every CPython ships, split into train / held-out by document.

Two sources, both read from the running interpreter's standard library:
- `pydoc_data.topics.topics`: the language reference topics `help()` shows (one document each);
- the docstrings of the standard library's `.py` files, collected with `ast` in source order
  (one document per module; tests and site-packages are skipped, repeated docstrings kept once).

The split is by document and depends only on the document's name (a hash), so a document lands
on the same side on every Python version that has it. Token streams put the end-of-sequence id
after each document. The standard library differs between Python versions: record the version
with any number measured on this corpus (`python_version()`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FormatError
from .tokenizer import Tokenizer

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One unit of the corpus: `name` is "pydoc:TOPIC" or "stdlib:PATH/OF/module.py"."""

    name: str
    text: str


def python_version() -> str:
    return platform.python_version()


def pydoc_documents() -> list[Document]:
    """The topics of `pydoc_data.topics`, sorted by topic name."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{k}", topics[k]) for k in sorted(topics) if topics[k].strip()]


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            yield doc
        children = [n for n in getattr(node, "body", [])
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend(reversed(children))


def docstring_documents(root: str | Path | None = None, min_chars: int = 16) -> list[Document]:
    """One document per standard-library module under `root` (default: this interpreter's),
    sorted by path: its docstrings of at least `min_chars` characters joined by blank lines.
    A docstring already seen in an earlier module is dropped; unparsable files are skipped."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(rel))
        except (SyntaxError, ValueError, OSError):
            continue
        kept = []
        for doc in _docstrings(tree):
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                kept.append(doc)
        if kept:
            docs.append(Document(f"stdlib:{rel.as_posix()}", "\n\n".join(kept)))
    return docs


def corpus(docstrings: bool = True) -> list[Document]:
    """The pydoc topics, plus the standard-library docstrings when `docstrings`."""
    return pydoc_documents() + (docstring_documents() if docstrings else [])


def is_heldout(name: str, fraction: float) -> bool:
    """Whether the document `name` is held out: the first 32 bits of sha256(name), as a
    fraction of 2**32, fall below `fraction`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") < fraction * 2**32


def split(docs: Sequence[Document], heldout_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, held_out) by document name, order kept."""
    train = [d for d in docs if not is_heldout(d.name, heldout_fraction)]
    held = [d for d in docs if is_heldout(d.name, heldout_fraction)]
    return train, held


def token_stream(tokenizer: Tokenizer, docs: Iterable[Document]) -> torch.Tensor:
    """All documents encoded and concatenated, each followed by the eos id: int64 `[N]`."""
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.text)
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def write_documents(path: str | Path, docs: Iterable[Document]) -> None:
    """Documents as JSON lines `{"name", "text"}` (write atomically)."""
    from .io.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps({"name": d.name, "text": d.text}) + "\n" for d in docs),
                       encoding="utf-8")


def read_documents(path: str | Path) -> list[Document]:
    """Documents from a JSON-lines file written by `write_documents`. Raises FormatError."""
    docs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            d = json.loads(line)
            docs.append(Document(d["name"], d["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{path}:{n}: expected a JSON object with 'name' and 'text', found "
                              f"{line[:60]!r} ({e})") from None
    return docs


def train_tokenizer(docs: Iterable[Document], vocab_size: int = 4096, seed: int = 0,
                    model_type: str = "bpe") -> bytes:
    """Train a SentencePiece model on the documents; returns the model file's bytes.

    Lossless on any text but U+2581 (SentencePiece's space marker, decoded as a space):
    identity normalisation, whitespace kept as is, no dummy prefix, newline as its own
    piece, digits split, unseen characters as UTF-8 bytes (byte fallback). Special ids:
    unk 0, bos 1, eos 2, pad 3. Deterministic for the same documents and seed."""
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    paragraphs = [p for d in docs for p in d.text.split("\n\n") if p.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1, minloglevel=2)
    return out.getvalue()
