"""The demo tokenizer is lossless: any text (non-ASCII through byte fallback, whitespace and
newlines as they are) decodes back to itself; its training is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_fn import data
from pangu_fn.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
SPACE_MARK = "\u2581"  # SentencePiece's space marker: decodes as a space (documented limitation)

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO / "target")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_characters=SPACE_MARK, exclude_categories=("Cs",)), max_size=80))
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  # two spaces\n\n\ttab\r\n",
    "  leading and trailing  ",
    "naïve café, Ελληνικά, русский, 日本語, 中文, 한국어, العربية",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧, combining e\u0301, NUL \x00, BOM \ufeff",
    "special-token strings are plain text: <s> </s> <pad> <unk>",
    "",
])
def test_examples_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes(tok):
    ids = tok.encode("\U0001F9EA")  # a test-tube emoji: not a piece, four UTF-8 bytes
    assert [tok.sp.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAA>"]
    assert tok.decode(ids) == "\U0001F9EA"
    assert tok.decode(tok.encode(f"a{SPACE_MARK}b")) == "a b"  # the one character that does not round-trip


def test_committed_tokenizer_is_reproducible_on_the_same_python(tok):
    m = json.loads((DEMO / "metrics.json").read_text())
    if m["python"] != data.python_version():
        pytest.skip(f"demo corpus was built on Python {m['python']}, this is {data.python_version()}")
    train_docs, _ = data.split(data.corpus(), m["args"]["heldout_fraction"])
    assert data.train_tokenizer(train_docs, m["tokenizer"]["vocab_size"], m["seed"]) == tok.path.read_bytes()


def test_tokenizer_training_is_deterministic_and_lossless(tmp_path):
    docs = data.pydoc_documents()[:20]
    first, second = (data.train_tokenizer(docs, vocab_size=512) for _ in range(2))
    assert first == second
    (tmp_path / "tokenizer.model").write_bytes(first)
    small = load_tokenizer(tmp_path)
    assert (small.vocab_size, small.bos_id, small.eos_id, small.pad_id) == (512, 1, 2, 3)
    text = docs[0].text + " ü 日本 🙂"
    assert small.decode(small.encode(text)) == text
