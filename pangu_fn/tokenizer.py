"""Tokenizers: SentencePiece model files (openPangu `tokenizer.model`, PanGu-α `vocab.model`
with its jieba + U+2582/U+2583 rules) and Hugging Face `tokenizer.json` files, behind one
small protocol. `load_tokenizer(folder)` finds whichever sits beside a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

from .errors import ConfigError, FormatError

SP_FILES = ("tokenizer.model", "vocab.model")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model; special ids from the model, overridden by a
    `tokenizer_config.json` beside it (e.g. openPangu's eos `[unused10]`)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise ConfigError("SentencePiece tokenizers need the 'sentencepiece' package "
                              "(pip install sentencepiece)") from None
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise FormatError(f"{self.path}: not a SentencePiece model: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        for kind, piece in _special_tokens(self.path.parent).items():
            pid = self.sp.piece_to_id(piece)
            if pid != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id()):
                ids[kind] = pid
        self.bos_id, self.eos_id, self.pad_id = (i if i is not None and i >= 0 else None for i in ids.values())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)])

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


class PanguAlphaTokenizer(SentencePieceTokenizer):
    """PanGu-α's `vocab.model`: text is cut into words by jieba, spaces and newlines become
    U+2582 and U+2583, words are joined by spaces and encoded; decoding reverses it."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        try:
            import jieba
        except ImportError:
            raise ConfigError("PanGu-α tokenizers need the 'jieba' package (pip install jieba)") from None
        jieba.setLogLevel(60)
        self._cut = jieba.cut

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        words = [w.translate({ord(" "): "\u2582", ord("\n"): "\u2583"}) for w in self._cut(text, cut_all=False)]
        ids = self.sp.encode(" ".join(words))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        text = super().decode(ids)
        return text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` package."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise ConfigError("tokenizer.json files need the 'tokenizers' package (pip install tokenizers)") from None
        self.path = Path(path)
        try:
            self.tok = _Tok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise FormatError(f"{self.path}: not a tokenizers JSON file: {e}") from None
        self.vocab_size = self.tok.get_vocab_size()
        special = _special_tokens(self.path.parent)
        self.bos_id, self.eos_id, self.pad_id = (
            self.tok.token_to_id(special[k]) if k in special else None for k in ("bos", "eos", "pad"))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def find_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer file in a model folder, or None."""
    folder = Path(folder)
    for name in (*SP_FILES, "tokenizer.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a file or from the model folder holding one. PanGu-α's
    `vocab.model` gets the jieba rules. Raises ConfigError when there is none."""
    path = Path(path)
    file = find_tokenizer(path) if path.is_dir() else path
    if file is None or not file.is_file():
        raise ConfigError(f"{path}: no tokenizer found; expected one of {(*SP_FILES, 'tokenizer.json')}")
    if file.name == "vocab.model":
        return PanguAlphaTokenizer(file)
    if file.suffix == ".model":
        return SentencePieceTokenizer(file)
    return HFTokenizer(file)


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings from a `tokenizer_config.json`, if present."""
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{f}: not valid JSON: {e}") from None
    out = {}
    for kind in ("bos", "eos", "pad"):
        tok = d.get(f"{kind}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str):
            out[kind] = tok
    return out
