"""Tokenizer files: openPangu's SentencePiece model with special tokens from
tokenizer_config.json and its chat template, PanGu-α's vocab.model with the jieba rules, a
Hugging Face tokenizer.json, the error naming the extra when a package is missing, and
`pangu convert` carrying the tokenizer along. Models are trained here, in a fraction of a second."""

from __future__ import annotations

import io
import json
import sys

import jinja2
import pytest
from helpers import random_model
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.tokenizer import (
    HFTokenizer,
    PanguAlphaTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    openpangu_chat_prompt,
)

TEXT = ["你好 世界 再见 朋友", "hello world 你好", "今天 天气 很 好", "我们 一起 学习 模型", "系统 用户 助手 工具 方法"]
# openPangu-Embedded's tokenizer_config.json chat_template (the model's published config)
OPENPANGU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '[unused9]系统：[unused10]' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '[unused9]系统：' + message['content'] + '[unused10]' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{'[unused9]助手：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'tool' %}{{'[unused9]工具：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'function' %}{{'[unused9]方法：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'user' %}{{'[unused9]用户：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}")


def train_sp(lines: list[str], **kw) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 40), model_writer=model, vocab_size=90,
                                   model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2, **kw)
    return model.getvalue()


@pytest.fixture(scope="module")
def openpangu_folder(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("openpangu")
    proto = train_sp(TEXT + ["：，。"], control_symbols=["[unused9]", "[unused10]"])
    (folder / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    added = {str(sp.piece_to_id(p)): {"content": p, "special": True} for p in ("<unk>", "<s>", "</s>", "[unused9]", "[unused10]")}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "[unused10]", "pad_token": "<unk>",
         "chat_template": OPENPANGU_TEMPLATE}, ensure_ascii=False))
    return folder, sp


def test_openpangu_special_ids_come_from_the_files(openpangu_folder):
    folder, sp = openpangu_folder
    tok = load_tokenizer(folder)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.eos_id == sp.piece_to_id("[unused10]") != sp.eos_id()
    assert tok.bos_id == sp.bos_id() and tok.pad_id == sp.piece_to_id("<unk>") == 0
    assert tok.special_tokens["[unused9]"] == sp.piece_to_id("[unused9]")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "今天"}, {"role": "user", "content": "你好"}, {"role": "assistant", "content": "再见"},
     {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "一起"}, {"role": "tool", "content": "{}"}, {"role": "function", "content": "x"}],
])
def test_chat_template_matches_the_published_jinja(openpangu_folder, messages):
    folder, sp = openpangu_folder
    for gen in (True, False):
        want = jinja2.Template(OPENPANGU_TEMPLATE).render(messages=messages, add_generation_prompt=gen)
        assert openpangu_chat_prompt(messages, add_generation_prompt=gen) == want
    ids = load_tokenizer(folder).encode(openpangu_chat_prompt(messages))
    u9, u10 = sp.piece_to_id("[unused9]"), sp.piece_to_id("[unused10]")
    # every marker is one id; the text between markers is encoded by SentencePiece on its own
    expected, text = [], openpangu_chat_prompt(messages)
    for i, chunk in enumerate(text.split("[unused9]")):
        if i:
            expected.append(u9)
        for j, part in enumerate(chunk.split("[unused10]")):
            if j:
                expected.append(u10)
            if part:
                expected += sp.encode(part)
    assert ids == expected and ids.count(u9) == text.count("[unused9]")


def test_chat_roles_are_checked():
    with pytest.raises(pf.InputError, match="chat message 0"):
        openpangu_chat_prompt([{"role": "robot", "content": "hi"}])


def test_pangu_alpha_jieba_rules(tmp_path):
    import jieba
    import sentencepiece as spm

    sample = ["你好世界，今天天气很好。", "我们一起 学习\n模型", "hello world"]
    cut = [" ".join(w.replace(" ", "\u2582").replace("\n", "\u2583") for w in jieba.cut(t)) for t in sample]
    proto = train_sp(cut, user_defined_symbols=["<eod>", "<pad>"], normalization_rule_name="identity")
    (tmp_path / "vocab.model").write_bytes(proto)
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert isinstance(tok, PanguAlphaTokenizer)
    assert tok.eos_id == sp.piece_to_id("<eod>") and tok.pad_id == sp.piece_to_id("<pad>")
    for text, joined in zip(sample, cut):
        assert tok.encode(text) == sp.encode(joined)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("你好<eod>") == sp.encode(" ".join(jieba.cut("你好"))) + [tok.eos_id]


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<s>", "</s>", "[unused10]"])
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.special_tokens["[unused10]"] == 5
    assert tok.encode("hello world[unused10]", add_bos=True) == [1, 3, 4, 5]


@pytest.mark.parametrize("module,file,cls", [("jieba", "vocab.model", PanguAlphaTokenizer),
                                             ("sentencepiece", "tokenizer.model", SentencePieceTokenizer),
                                             ("tokenizers", "tokenizer.json", HFTokenizer)])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, module, file, cls):
    (tmp_path / file).write_bytes(b"unused")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(pf.ConfigError, match=rf"'{module}' package: pip install 'pangu-fn\[tokenizer\]'"):
        cls(tmp_path / file)


def test_convert_carries_the_tokenizer(openpangu_folder, tmp_path):
    folder, _ = openpangu_folder
    params, cfg = random_model("tiny-openpangu")
    extra = {f.name: f.read_bytes() for f in folder.iterdir()}
    pf.save(tmp_path / "src", params, cfg, extra_files=extra)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    text = openpangu_chat_prompt([{"role": "user", "content": "你好 world"}])
    assert load_tokenizer(tmp_path / "ours").encode(text) == load_tokenizer(folder).encode(text)
    assert (tmp_path / "ours" / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()
