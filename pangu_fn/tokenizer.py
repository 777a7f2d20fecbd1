"""Tokenizers: SentencePiece model files (openPangu `tokenizer.model`, PanGu-α `vocab.model`
with its jieba + U+2582/U+2583 rules) and Hugging Face `tokenizer.json` files, behind one
small protocol. `load_tokenizer(folder)` finds whichever sits beside a model.

Special tokens come from the files: the SentencePiece model's own ids, overridden by
`tokenizer_config.json` / `special_tokens_map.json` beside it; tokens listed in
`added_tokens_decoder` (openPangu's `[unused9]`, `[unused10]`, ...) are recognised in text as
single ids, as Hugging Face tokenizers do (PanGu-α: its bos/eos/pad pieces too). `openpangu_chat_prompt` renders openPangu's chat
template. A missing optional package gives a ConfigError naming the extra that installs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

from .errors import ConfigError, FormatError

SP_FILES = ("tokenizer.model", "vocab.model")
# files that travel with a model's tokenizer (copied by `pangu convert`)
TOKENIZER_FILES = ("tokenizer.model", "vocab.model", "vocab.vocab", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
EXTRA = "pip install 'pangu-fn[tokenizer]'"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model; special ids from the model, overridden by the
    `tokenizer_config.json` / `special_tokens_map.json` beside it (e.g. openPangu's eos
    `[unused10]`). `special_tokens` maps the tokens of `added_tokens_decoder` (strings that
    encode to one id wherever they appear in text) to their ids."""

    # pieces that name the special ids when no tokenizer_config.json says otherwise
    DEFAULT_PIECES: Mapping[str, str] = {}

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise ConfigError(f"SentencePiece tokenizers need the 'sentencepiece' package: {EXTRA}") from None
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise FormatError(f"{self.path}: not a SentencePiece model: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        named = {**self.DEFAULT_PIECES, **_special_tokens(self.path.parent)}
        for kind, piece in named.items():
            pid = self._piece_id(piece)
            if pid is not None:
                ids[kind] = pid
        self.bos_id, self.eos_id, self.pad_id = (i if i is not None and i >= 0 else None for i in ids.values())
        self.special_tokens = {p: i for p, i in _added_tokens(self.path.parent).items() if i < self.vocab_size}
        self._split = _splitter(self.special_tokens)

    def _piece_id(self, piece: str) -> int | None:
        pid = self.sp.piece_to_id(piece)
        return pid if pid != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id()) else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special token strings in it become their single ids."""
        ids = [] if not (add_bos and self.bos_id is not None) else [self.bos_id]
        for part, special in self._split(text):
            ids += [self.special_tokens[part]] if special else self._encode_plain(part)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)])

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


class PanguAlphaTokenizer(SentencePieceTokenizer):
    """PanGu-α's `vocab.model`: text is cut into words by jieba, spaces and newlines become
    U+2582 and U+2583, words are joined by spaces and encoded; decoding reverses it. The
    end-of-document piece `<eod>` is the eos id and `<pad>` the pad id (looked up in the model:
    the released piece table is not documented), unless a tokenizer_config.json says otherwise."""

    DEFAULT_PIECES: ClassVar[dict[str, str]] = {"eos": "<eod>", "pad": "<pad>"}

    def __init__(self, path: str | Path) -> None:
        try:
            import jieba
        except ImportError:
            raise ConfigError(f"PanGu-α tokenizers (vocab.model) need the 'jieba' package: {EXTRA}") from None
        super().__init__(path)
        jieba.setLogLevel(60)
        self._cut = jieba.cut
        # jieba would cut "<eod>" apart, so the named special pieces are matched before it
        self.special_tokens.update({self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.pad_id)
                                    if i is not None})
        self._split = _splitter(self.special_tokens)

    def _encode_plain(self, text: str) -> list[int]:
        words = [w.translate({ord(" "): "\u2582", ord("\n"): "\u2583"}) for w in self._cut(text, cut_all=False)]
        return self.sp.encode(" ".join(words))

    def decode(self, ids: Sequence[int]) -> str:
        text = super().decode(ids)
        return text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` package."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise ConfigError(f"tokenizer.json files need the 'tokenizers' package: {EXTRA}") from None
        self.path = Path(path)
        try:
            self.tok = _Tok.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on bad JSON)
            raise FormatError(f"{self.path}: not a tokenizers JSON file: {e}") from None
        self.vocab_size = self.tok.get_vocab_size()
        special = _special_tokens(self.path.parent)
        self.bos_id, self.eos_id, self.pad_id = (
            self.tok.token_to_id(special[k]) if k in special else None for k in ("bos", "eos", "pad"))
        self.special_tokens = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

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


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files (`TOKENIZER_FILES`) present in `folder`."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def openpangu_chat_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """openPangu-Embedded's chat template as text: each message becomes
    `[unused9]<role>：<content>[unused10]` (roles 系统 system, 用户 user, 助手 assistant,
    工具 tool, 方法 function), an empty system turn leads when the first message is not a
    system one, and `[unused9]助手：` follows when `add_generation_prompt`. Encode the result
    with the model's tokenizer (its `[unused*]` markers become single ids). Raises InputError
    for an unknown role or a message without content."""
    from .errors import InputError

    roles = {"system": "系统", "user": "用户", "assistant": "助手", "tool": "工具", "function": "方法"}
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in roles or not isinstance(content, str):
            raise InputError(f"chat message {i}: expected a role in {sorted(roles)} and string content, found {dict(m)}")
        if i == 0 and role != "system":
            parts.append("[unused9]系统：[unused10]")
        parts.append(f"[unused9]{roles[role]}：{content}[unused10]")
    if add_generation_prompt:
        parts.append("[unused9]助手：")
    return "".join(parts)


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{f}: expected a JSON object, found {type(d).__name__}")
    return d


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings from `special_tokens_map.json` and `tokenizer_config.json`
    (the latter wins), if present."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        d = _read_json(f)
        for kind in ("bos", "eos", "pad"):
            tok = d.get(f"{kind}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str):
                out[kind] = tok
    return out


def _added_tokens(folder: Path) -> dict[str, int]:
    """Special token string -> id from `tokenizer_config.json`'s `added_tokens_decoder`."""
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    out = {}
    for key, tok in (_read_json(f).get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and str(key).isdigit():
            out[tok["content"]] = int(key)
    return out


def _splitter(specials: Mapping[str, int]):
    """text -> [(part, is_special)], splitting on the special strings (longest first)."""
    if not specials:
        return lambda text: [(text, False)] if text else []
    rx = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")

    def split(text: str) -> list[tuple[str, bool]]:
        return [(p, i % 2 == 1) for i, p in enumerate(rx.split(text)) if p]

    return split
