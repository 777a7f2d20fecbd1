"""llama.cpp itself runs our GGUF files: its greedy tokens equal ours (f32 and f16) and its logits
match ours to 1e-3 (f32; gpt2: 1e-3 of the largest logit), for the demo model and random openPangu (`pangu-embedded`, and `llama`
without biases, whose q/k rows are permuted for llama.cpp's RoPE) and GPT-style (`gpt2`) models.

Needs llama-cpp-python (it compiles llama.cpp; see docs/export.md for the command), so the
module is skipped where it is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_model
from test_tokenizer_formats import train_sp

import pangu_fn as pf
from pangu_fn.tokenizer import load_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
from pangu_export.gguf import export_gguf

NEW_TOKENS = 12


def sp_folder(tmp_path):
    folder = tmp_path / "sp"
    folder.mkdir()
    proto = train_sp(["你好 世界 再见 朋友", "hello world 你好", "今天 天气 很 好"], normalization_rule_name="identity")
    (folder / "tokenizer.model").write_bytes(proto)
    return folder, load_tokenizer(folder).vocab_size


def bpe_folder(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello there", "the world says hello"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder, tok.get_vocab_size()


def case(name: str, tmp_path):
    """(params fp32, cfg, tokenizer folder, prompts) of one model."""
    if name == "demo":
        params, cfg = pf.load("models/demo/target", dtype="fp32")
        tok = load_tokenizer("models/demo/target")
        prompts = [tok.encode(t, add_bos=True) for t in ("从前有一个", "The cat", "今天天气很好，我们")]
        return params, cfg, "models/demo/target", prompts
    folder, vocab = bpe_folder(tmp_path) if name == "gpt2" else sp_folder(tmp_path)
    preset, changes = {"gpt2": ("tiny-gpt", {}), "pangu-embedded": ("tiny-openpangu", {}),
                       "llama": ("tiny-openpangu", {"attn_bias": False})}[name]
    params, cfg = random_model(preset, seed=5, vocab_size=vocab, **changes)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 5, 11)]
    return params, cfg, folder, prompts


def ours_greedy(params, cfg, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        logits, _ = pf.forward(params, cfg, torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def llama_greedy(llm, prompt: list[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("name", ["demo", "pangu-embedded", "llama", "gpt2"])
@pytest.mark.parametrize("type", ["f32", "f16"])
def test_llama_cpp_matches_pangu_fn(tmp_path, name, type):
    params, cfg, tokenizer, prompts = case(name, tmp_path)
    path = tmp_path / f"{name}-{type}.gguf"
    summary = export_gguf(params, cfg, path, type, tokenizer=tokenizer, progress=False)
    assert summary.arch == ("pangu-embedded" if name == "demo" else name)
    f32 = llama_cpp.GGML_TYPE_F32  # llama.cpp's KV cache is f16 unless asked
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=f32, type_v=f32)
    ours_tree, _ = pf.load(path, dtype="fp32")  # the file's weights (f16: rounded as llama.cpp reads them)
    for prompt in prompts:
        assert llama_greedy(llm, prompt) == ours_greedy(ours_tree, cfg, prompt), prompt
        if type == "f32":
            llm.reset()
            llm.eval(prompt)
            theirs = np.array(llm.scores[: len(prompt)])
            ours = pf.forward(params, cfg, torch.tensor([prompt]))[0][0].numpy()
            # llama.cpp's CPU GELU reads a table indexed by the input rounded to f16 (ggml's
            # GGML_GELU_FP16), so for gpt2 the bound is relative to the logits' size
            bound = 1e-3 * (np.abs(ours).max() if name == "gpt2" else 1.0)
            assert np.abs(theirs - ours).max() < bound, np.abs(theirs - ours).max()


def test_bench_gguf_rows(tmp_path):
    """`pangu bench --gguf`: a pangu-fn and a llama.cpp row per type, on the same prompt."""
    from pangu_tools.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-openpangu", "--gguf", str(tmp_path / "files"), "--gguf-types", "f32,q4_0",
                 "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["engine"], r["dtype"]) for r in rows[1:]] == [
        ("pangu-fn", "fp32"), ("llama.cpp", "f32"), ("pangu-fn", "int4-g32"), ("llama.cpp", "q4_0")]
    assert rows[2]["same_tokens"] is True and rows[2]["vs_pangu_fn"] == round(
        rows[2]["decode_tok_s"] / rows[1]["decode_tok_s"], 3)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["model-f32.gguf", "model-q4_0.gguf"]
