"""The bundle's tokenizer, without torch: a SentencePiece model (PanGu-α's `vocab.model`
with its jieba word cutting and U+2582/U+2583 space/newline rules) or a Hugging Face
`tokenizer.json`. Special ids come from the manifest (resolved at export time)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import BundleFormatError

KINDS = ("sentencepiece", "pangu-alpha", "tokenizers")


class BundleTokenizer:
    """`encode(text, add_bos=False) -> ids`, `decode(ids) -> text` (special ids dropped)."""

    def __init__(self, path: Path, kind: str, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> None:
        if kind not in KINDS:
            raise BundleFormatError(f"{path}: unknown tokenizer kind {kind!r}; expected one of {KINDS}")
        self.kind, self.bos_id, self.eos_id, self.pad_id = kind, bos_id, eos_id, pad_id
        self._cut: Any = None
        if kind == "tokenizers":
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(path))
            self.vocab_size = self._tok.get_vocab_size()
            return
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        if kind == "pangu-alpha":
            import jieba

            jieba.setLogLevel(60)
            self._cut = jieba.cut

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if self.kind == "tokenizers":
            ids = self._tok.encode(text, add_special_tokens=False).ids
        elif self._cut is not None:
            words = [w.translate({ord(" "): "\u2582", ord("\n"): "\u2583"}) for w in self._cut(text, cut_all=False)]
            ids = self._sp.encode(" ".join(words))
        else:
            ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        ids = [int(i) for i in ids if i not in special]
        if self.kind == "tokenizers":
            return self._tok.decode(ids, skip_special_tokens=True)
        text = self._sp.decode(ids)
        if self._cut is not None:
            text = text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")
        return text
