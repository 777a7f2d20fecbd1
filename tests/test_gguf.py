"""GGUF out and in: our tree -> GGUF (the `gguf` package's writer and quantizers) -> our tree.

Independent references: the `gguf` package's own reader and dequantizers (a tensor read back
must equal `dequantize(quantize(original))`), its key and tensor-name tables (what llama.cpp
requires), and the source tokenizer's encodings. llama.cpp itself: tests/test_gguf_llamacpp.py."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import random_model
from pangu_tools.cli import main
from test_tokenizer_formats import OPENPANGU_TEMPLATE, train_sp

import pangu_fn as pf
from pangu_fn.errors import ConfigError, FormatError
from pangu_fn.tokenizer import load_tokenizer
from pangu_fn.tree import flatten

gguf = pytest.importorskip("gguf")
from pangu_export.gguf import export_gguf

DEMO = "models/demo/target"
MODELS = {"gpt2": ("tiny-gpt", {}), "gpt2-untied": ("tiny-gpt", {"tie_embeddings": False}),
          "pangu-embedded": ("tiny-openpangu", {}), "llama": ("tiny-openpangu", {"attn_bias": False}),
          "pangu-embedded-untied": ("tiny-openpangu", {"tie_embeddings": False})}
# largest |logit difference| over the logits' standard deviation, by type; measured on these random
# models (logit std ~8): 1.2e-3 / 2.6e-3 (f16), 1.3e-2 / 2.0e-2 (bf16), 3.5e-2 / 4.7e-2 (q8_0), 0.5 / 1.05 (q4_0)
TOLERANCE = {"f16": 1e-2, "bf16": 6e-2, "q8_0": 0.15, "q4_0": 3.0}
TEXTS = ["hello world", "你好 世界 再见", "a  b\n\ncd 123 4567", "[unused9]用户：你好[unused10][unused9]助手："]


def model(key: str):
    preset, changes = MODELS[key]
    return random_model(preset, seed=3, **changes)


def logits(params, cfg) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 33, 60, 100, 7, 2]])
    return pf.forward(params, cfg, ids)[0]


@pytest.mark.parametrize("key", list(MODELS))
def test_f32_round_trip_is_identical(tmp_path, key):
    params, cfg = model(key)
    summary = export_gguf(params, cfg, tmp_path / "m.gguf", "f32", progress=False)
    assert summary.arch == key.removesuffix("-untied")
    back, cfg_back = pf.load(tmp_path / "m.gguf")
    assert cfg_back == cfg
    a, b = flatten(params), flatten(back)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("type", list(TOLERANCE))
@pytest.mark.parametrize("key", ["gpt2", "pangu-embedded"])
def test_typed_round_trip_equals_the_gguf_packages_quantizer(tmp_path, key, type):
    params, cfg = model(key)
    export_gguf(params, cfg, tmp_path / "m.gguf", type, progress=False)
    back, cfg_back = pf.load(tmp_path / "m.gguf", dtype="fp32")
    qtype = getattr(gguf.GGMLQuantizationType, type.upper())
    for name in ("tok_embed.weight", "blocks.1.attn.k.weight", "blocks.0.mlp.down.weight"):
        w = flatten(params)[name].float().numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert np.array_equal(flatten(back)[name].numpy(), expected.astype(np.float32)), name
    tree_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(type, torch.float32)  # norms are stored f32
    assert torch.equal(flatten(back)["final_norm.weight"], flatten(params)["final_norm.weight"].to(tree_dtype).float())
    ref = logits(params, cfg)
    diff = (ref - logits(back, cfg_back)).abs().max().item()
    assert 0 < diff < TOLERANCE[type] * ref.std().item()


def test_metadata_llama_cpp_requires(tmp_path):
    """The keys llama.cpp's loader reads without a default, named by the gguf package, and
    tensor names that all belong to the architecture's table."""
    K = gguf.Keys
    for key in ("gpt2", "pangu-embedded"):
        params, cfg = model(key)
        export_gguf(params, cfg, tmp_path / f"{key}.gguf", "q8_0", progress=False)
        reader = gguf.GGUFReader(tmp_path / f"{key}.gguf")
        fields = reader.fields
        assert fields[K.General.ARCHITECTURE].contents() == key
        required = [K.LLM.CONTEXT_LENGTH, K.LLM.EMBEDDING_LENGTH, K.LLM.BLOCK_COUNT, K.LLM.FEED_FORWARD_LENGTH,
                    K.Attention.HEAD_COUNT]
        required += [K.Attention.LAYERNORM_EPS] if key == "gpt2" else \
            [K.Attention.HEAD_COUNT_KV, K.Attention.LAYERNORM_RMS_EPS, K.Rope.FREQ_BASE, K.Rope.DIMENSION_COUNT]
        for k in required:
            assert k.format(arch=key) in fields, k
        assert fields[K.Tokenizer.MODEL].contents() == "none"  # no tokenizer given: llama.cpp's vocab-less model
        assert fields[K.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
        assert fields[K.LLM.BLOCK_COUNT.format(arch=key)].contents() == cfg.num_layers
        arch = {"gpt2": gguf.MODEL_ARCH.GPT2, "pangu-embedded": gguf.MODEL_ARCH.PANGU_EMBED}[key]
        allowed = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch] for i in range(cfg.num_layers)}
        names = {t.name.rsplit(".", 1)[0] for t in reader.tensors}
        assert names <= allowed and ("blk.0.attn_qkv" in names) == (key == "gpt2")
        qkv = {t.name: t for t in reader.tensors}.get("blk.0.attn_qkv.weight")
        if qkv is not None:  # numpy [3H, H] is ggml's {H, 3H}
            assert list(qkv.shape) == [cfg.hidden_size, 3 * cfg.hidden_size]


def test_demo_model_and_sentencepiece_tokenizer_round_trip(tmp_path, capsys):
    src = tmp_path / "demo"
    shutil.copytree(DEMO, src)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": OPENPANGU_TEMPLATE},
        ensure_ascii=False))
    assert main(["export", str(src), str(tmp_path / "demo.gguf"), "--target", "gguf", "--type", "f32"]) == 0
    assert "gguf pangu-embedded f32" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "demo.gguf"), str(tmp_path / "back"), "--verify"]) == 0
    assert "largest |logit difference|" in capsys.readouterr().out
    params, cfg = pf.load(src, dtype="fp32")
    back, cfg_back = pf.load(tmp_path / "back")
    assert cfg_back == cfg and all(torch.equal(a, b) for a, b in zip(flatten(params).values(), flatten(back).values()))
    config = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == OPENPANGU_TEMPLATE
    a, b = load_tokenizer(src), load_tokenizer(tmp_path / "back")
    assert (a.bos_id, a.eos_id, a.pad_id, a.vocab_size) == (b.bos_id, b.eos_id, b.pad_id, b.vocab_size) == (1, 2, 3, 4096)
    for text in TEXTS:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(a.encode(text)) == a.decode(a.encode(text))


def test_openpangu_special_tokens_round_trip(tmp_path):
    """added_tokens_decoder specials ([unused9], [unused10] as eos) survive, as llama.cpp control tokens."""
    import sentencepiece as spm

    folder = tmp_path / "src"
    folder.mkdir()
    proto = train_sp(["你好 世界 再见 朋友", "hello world 你好", "用户 助手 系统：，。"],
                     control_symbols=["[unused9]", "[unused10]"], normalization_rule_name="identity")
    (folder / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    added = {str(sp.piece_to_id(p)): {"content": p, "special": True} for p in ("[unused9]", "[unused10]")}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "[unused10]", "chat_template": OPENPANGU_TEMPLATE},
        ensure_ascii=False))
    params, cfg = random_model("tiny-openpangu", vocab_size=sp.get_piece_size())
    export_gguf(params, cfg, tmp_path / "m.gguf", "q8_0", tokenizer=folder, progress=False)
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields[gguf.Keys.Tokenizer.MODEL].contents() == "llama"
    assert fields[gguf.Keys.Tokenizer.EOS_ID].contents() == sp.piece_to_id("[unused10]")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    a, b = load_tokenizer(folder), load_tokenizer(tmp_path / "back")
    assert (b.bos_id, b.eos_id) == (a.bos_id, a.eos_id) == (sp.bos_id(), sp.piece_to_id("[unused10]"))
    assert {k: b.special_tokens[k] for k in ("[unused9]", "[unused10]")} == {k: int(i) for i, k in
                                                                             [(i, t["content"]) for i, t in added.items()]}
    for text in TEXTS:
        assert b.encode(text) == a.encode(text), text


def test_bpe_tokenizer_json_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, hello there", "the world says hello", "你好 世界"] * 20, trainer)
    folder = tmp_path / "src"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    params, cfg = random_model("tiny-gpt", vocab_size=tok.get_vocab_size() + 3)  # 3 rows no token uses
    export_gguf(params, cfg, tmp_path / "m.gguf", "f16", tokenizer=folder, progress=False)
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields[gguf.Keys.Tokenizer.MODEL].contents() == "gpt2"
    assert len(fields[gguf.Keys.Tokenizer.MERGES].contents()) == len(json.loads(tok.to_str())["model"]["merges"])
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    a, b = load_tokenizer(folder), load_tokenizer(tmp_path / "back")
    assert (b.bos_id, b.eos_id) == (a.bos_id, a.eos_id) == (0, 0)
    for text in [*TEXTS, "hello<|endoftext|>world"]:
        assert b.encode(text) == a.encode(text), text
        assert b.decode(a.encode(text)) == a.decode(a.encode(text))


def test_quantized_trees(tmp_path, capsys):
    from pangu_fn.quant import QuantRecipe, quantize

    params, cfg = model("pangu-embedded")
    int4 = quantize(params, QuantRecipe(scheme="int4", group_size=32, compute_dtype="fp32", prepack=False))
    summary = export_gguf(int4, cfg, tmp_path / "int4.gguf", "q4_0", progress=False)
    assert any("written directly as q4_0" in n for n in summary.notes)
    leaf = flatten(int4)["blocks.0.mlp.up.weight"]
    back, _ = pf.load(tmp_path / "int4.gguf", dtype="fp32")
    expected = (leaf.codes().float() - 8).reshape(leaf.shape[0], -1, 32) * \
        leaf.scales.half().float().reshape(leaf.shape[0], -1, 1)
    assert torch.equal(flatten(back)["blocks.0.mlp.up.weight"], expected.reshape(leaf.shape))
    int8 = quantize(params, QuantRecipe(scheme="int8", compute_dtype="fp32", prepack=False))
    pf.save(tmp_path / "int8", int8, cfg)
    assert main(["export", str(tmp_path / "int8"), str(tmp_path / "int8.gguf"), "--target", "gguf", "--type", "q8_0"]) == 0
    assert "quantized leaves dequantized and re-encoded as q8_0" in capsys.readouterr().err


def test_refused_models_write_nothing(tmp_path, capsys):
    params, cfg = random_model("tiny-alpha")
    with pytest.raises(ConfigError, match="PanGu-α has no llama.cpp architecture"):
        export_gguf(params, cfg, tmp_path / "a.gguf", progress=False)
    assert main(["export", "tiny-alpha", str(tmp_path / "a.gguf"), "--target", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pangu export: error: GGUF: PanGu-α")
    params, cfg = model("pangu-embedded")
    blk = params["blocks"][1]  # structured pruning: block 1 keeps 2 of 4 heads and half its FFN
    d = cfg.head_dim
    for p in ("q",):
        blk["attn"][p] = {"weight": blk["attn"][p]["weight"][: 2 * d], "bias": blk["attn"][p]["bias"][: 2 * d]}
    blk["attn"]["o"]["weight"] = blk["attn"]["o"]["weight"][:, : 2 * d]
    for p in ("gate", "up"):
        blk["mlp"][p] = {"weight": blk["mlp"][p]["weight"][:64]}
    blk["mlp"]["down"] = {"weight": blk["mlp"]["down"]["weight"][:, :64]}
    with pytest.raises(ConfigError, match="per-layer widths cannot be exported"):
        export_gguf(params, cfg, tmp_path / "p.gguf", progress=False)
    assert not any(tmp_path.iterdir())


def truncated(tmp_path, fraction: float):
    params, cfg = model("pangu-embedded")
    export_gguf(params, cfg, tmp_path / "m.gguf", "f16", progress=False)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("case", ["not gguf", "header cut", "data cut", "bert"])
def test_bad_gguf_files_give_one_line_errors(tmp_path, capsys, case):
    f = tmp_path / "m.gguf"
    if case == "not gguf":
        f.write_bytes(b"PK\x03\x04 not a gguf file at all")
    elif case == "header cut":
        truncated(tmp_path, 0.001)
    elif case == "data cut":
        truncated(tmp_path, 0.7)
    else:
        writer = gguf.GGUFWriter(f, "bert")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(FormatError, match=str(f)):
        pf.load(f)
    assert main(["convert", str(f), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pangu convert: error: ") and str(f) in err[0], err
    expected = {"not gguf": "expected a GGUF file", "header cut": "not a readable GGUF file",
                "data cut": "not a readable GGUF file", "bert": "'bert' is not one pangu-fn reads"}[case]
    assert expected in err[0]
    assert {p.name for p in tmp_path.iterdir()} == {"m.gguf"}


def test_bench_gguf_without_llama_cpp(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where it is not installed
    assert main(["bench", "--model", "tiny-gpt", "--gguf", "--new-tokens", "2", "--prompt-len", "4",
                 "--repeats", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pangu bench: error: --gguf needs llama-cpp-python: pip install 'pangu-fn[llama]'")
