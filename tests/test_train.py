"""Training code without retraining the committed models: the corpus split, a short run that
lowers the loss on real text, the distillation loss's identities, greedy agreement, and a tiny
`pangu train-demo` end to end."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

import pangu_fn as pf
from pangu_fn import data
from pangu_fn.errors import FormatError
from pangu_fn.evaluate import greedy_agreement, next_token_loss
from pangu_fn.tokenizer import load_tokenizer
from pangu_fn.train import (
    TrainConfig,
    continuation_windows,
    distillation_loss,
    mixed_batches,
    random_batches,
    train,
)


@pytest.fixture(scope="module")
def pydoc_tokens(tmp_path_factory):
    """(tokenizer, train ids, held-out ids) from a 1024-piece tokenizer trained on the pydoc topics."""
    train_docs, held_docs = data.split(data.pydoc_documents(), 0.1)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(data.train_tokenizer(train_docs, vocab_size=1024))
    tok = load_tokenizer(path)
    return tok, data.token_stream(tok, train_docs), data.token_stream(tok, held_docs)


def tiny_cfg(tok, layers: int = 2) -> pf.ModelConfig:
    return pf.ModelConfig.preset("tiny-openpangu").replace(
        vocab_size=tok.vocab_size, num_layers=layers, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id)


def test_split_is_by_document_deterministic_and_complete():
    docs = data.pydoc_documents()
    train_docs, held = data.split(docs, 0.2)
    assert {d.name for d in train_docs}.isdisjoint({d.name for d in held})
    assert len(train_docs) + len(held) == len(docs) and 0 < len(held) < len(docs)
    assert data.split(docs, 0.2) == (train_docs, held)
    # the side depends on the name only: a document keeps its side in a smaller corpus
    assert data.split(docs[::2], 0.2)[1] == [d for d in held if d in docs[::2]]
    assert all(h == (int(hashlib.sha256(d.name.encode()).hexdigest()[:8], 16) < 0.2 * 2**32)
               for d in docs for h in [data.is_heldout(d.name, 0.2)])


def test_docstring_documents_come_from_ast(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module doc, long enough."""\nclass A:\n    """Class doc, long enough."""\n'
        '    def f(self):\n        """Method doc, long enough."""\ndef g():\n    """Module doc, long enough."""\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text('"""Skipped: a test folder."""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    docs = data.docstring_documents(tmp_path)
    assert docs == [data.Document("stdlib:pkg/mod.py",
                                  "Module doc, long enough.\n\nClass doc, long enough.\n\nMethod doc, long enough.")]


def test_token_stream_ends_each_document_with_eos(pydoc_tokens):
    tok = pydoc_tokens[0]
    docs = [data.Document("a", "first text"), data.Document("b", "second")]
    ids = data.token_stream(tok, docs).tolist()
    assert ids == tok.encode("first text") + [tok.eos_id] + tok.encode("second") + [tok.eos_id]


def test_documents_round_trip_through_jsonl(tmp_path):
    docs = [data.Document("x", "line one\nline two ü"), data.Document("y", "")]
    data.write_documents(tmp_path / "d.jsonl", docs)
    assert data.read_documents(tmp_path / "d.jsonl") == docs
    (tmp_path / "bad.jsonl").write_text('{"name": "x"}\n')
    with pytest.raises(FormatError, match="bad.jsonl:1"):
        data.read_documents(tmp_path / "bad.jsonl")


def test_short_training_run_lowers_the_loss(pydoc_tokens):
    tok, train_ids, held_ids = pydoc_tokens
    cfg = tiny_cfg(tok)
    params = pf.init_params(cfg, seed=0)
    before = {k: v.clone() for k, v in params["tok_embed"].items()}
    held = held_ids[: 4 * 65].reshape(4, 65)
    with torch.no_grad():
        loss0 = next_token_loss(params, cfg, held).item()
    trained, losses = train(params, cfg, random_batches(train_ids, 8, 64, seed=0),
                            TrainConfig(steps=30, lr=1e-2, warmup=5), progress=False)
    with torch.no_grad():
        loss1 = next_token_loss(trained, cfg, held).item()
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert loss0 == pytest.approx(math.log(cfg.vocab_size), abs=0.2)  # an untrained model guesses uniformly
    assert loss1 < loss0 - 0.5 and sum(losses[-5:]) < sum(losses[:5]) - 2.5  # by > 0.5 nats
    assert torch.equal(params["tok_embed"]["weight"], before["weight"])  # the input tree is untouched


def test_distillation_loss_identities(pydoc_tokens):
    tok, train_ids, _ = pydoc_tokens
    cfg, small = tiny_cfg(tok, 2), tiny_cfg(tok, 1)
    teacher = pf.init_params(cfg, seed=1)
    student = pf.init_params(small, seed=2)
    batch = train_ids[: 2 * 33].reshape(2, 33)
    with torch.no_grad():
        assert distillation_loss(teacher, cfg, cfg, kl_weight=1.0)(teacher, batch).item() == pytest.approx(0, abs=1e-5)
        ce = next_token_loss(student, small, batch).item()
        assert distillation_loss(teacher, cfg, small, kl_weight=0.0)(student, batch).item() == pytest.approx(ce, rel=1e-5)
        mixed = distillation_loss(teacher, cfg, small, kl_weight=0.5)(student, batch).item()
        kl = distillation_loss(teacher, cfg, small, kl_weight=1.0)(student, batch).item()
    assert kl > 0 and mixed == pytest.approx(0.5 * kl + 0.5 * ce, rel=1e-5)


def test_greedy_agreement(pydoc_tokens):
    tok, train_ids, _ = pydoc_tokens
    cfg = tiny_cfg(tok)
    a, b = pf.init_params(cfg, seed=3), pf.init_params(cfg, seed=4)
    ids = train_ids[:100].tolist()
    assert greedy_agreement(a, cfg, a, cfg, ids, 32) == 1.0
    with torch.inference_mode():  # one window of 99 inputs: the same positions, computed by hand
        x = torch.tensor([ids[:99]])
        expected = (pf.forward(a, cfg, x)[0].argmax(-1) == pf.forward(b, cfg, x)[0].argmax(-1)).float().mean().item()
    assert greedy_agreement(a, cfg, b, cfg, ids, 99) == pytest.approx(expected, abs=1e-9)


def test_continuation_windows_are_prompts_from_the_stream_then_the_models_greedy_tokens(pydoc_tokens):
    tok, train_ids, _ = pydoc_tokens
    cfg = tiny_cfg(tok)
    params = pf.init_params(cfg, seed=5)
    windows = continuation_windows(params, cfg, train_ids, 5, 40, (6, 6), seed=1, batch_size=2)
    assert windows.shape == (5, 40)
    stream = train_ids.tolist()
    with torch.inference_mode():  # no cache: each continuation token is the argmax after the tokens before it
        greedy = pf.forward(params, cfg, windows[:, :-1])[0].argmax(-1)
    for row, want in zip(windows.tolist(), greedy.tolist()):
        assert any(stream[i:i + 6] == row[:6] for i in range(len(stream) - 5))
        assert row[6:] == want[5:]
    ragged = continuation_windows(params, cfg, train_ids, 6, 24, (3, 8), seed=2)
    assert ragged.shape == (6, 24)
    with pytest.raises(pf.InputError, match="prompt lengths 3..30 < width 24"):
        continuation_windows(params, cfg, train_ids, 2, 24, (3, 30))
    with pytest.raises(pf.InputError, match=f"the context {cfg.max_seq_len}"):
        continuation_windows(params, cfg, train_ids, 2, cfg.max_seq_len + 1)


def test_mixed_batches_take_the_given_share_of_rows_from_the_windows():
    windows = torch.full((3, 5), -1)
    real = iter(lambda: torch.arange(8 * 7).reshape(8, 7), None)
    assert torch.equal(next(mixed_batches(real, windows, 0.0)), torch.arange(8 * 7).reshape(8, 7)[:, :5])
    assert bool((next(mixed_batches(real, windows, 1.0)) == -1).all())
    rows = torch.cat([next(mixed_batches(real, windows, 0.25, seed=s)) for s in range(100)])
    share = (rows[:, 0] == -1).float().mean().item()
    assert 0.2 < share < 0.3  # 800 rows: 3 standard deviations are 0.046
    with pytest.raises(pf.InputError, match="at least 9 tokens wide, found 7"):
        next(mixed_batches(real, torch.zeros(2, 9, dtype=torch.long), 0.5))


def test_train_demo_command_tiny_end_to_end(tmp_path):
    from pangu_tools.cli import main

    out = tmp_path / "demo"
    assert main(["train-demo", "--out", str(out), "--pydoc-only", "--vocab-size", "512", "--hidden", "64",
                 "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--layers", "2", "--context", "128",
                 "--seq-len", "64", "--batch", "4", "--steps", "12", "--draft-steps", "4", "--eval-every", "0",
                 "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|$", card, re.MULTILINE)
    assert {name for name, _ in rows} == {"target/config.json", "target/model.safetensors", "target/tokenizer.model",
                                          "draft/config.json", "draft/model.safetensors", "draft/tokenizer.model",
                                          "heldout.jsonl", "metrics.json"}
    assert all(hashlib.sha256((out / name).read_bytes()).hexdigest() == digest for name, digest in rows)
    _, tcfg = pf.load(out / "target")
    _, dcfg = pf.load(out / "draft")
    assert (tcfg.num_layers, dcfg.num_layers, tcfg.max_seq_len) == (2, 1, 128)
    assert m["target"]["heldout_ppl"] < 0.9 * tcfg.vocab_size  # 12 steps already beat a uniform guess
    assert m["corpus"]["heldout_tokens"] == len(data.token_stream(
        load_tokenizer(out / "target"), data.read_documents(out / "heldout.jsonl")))
    assert main(["train-demo", "--out", str(tmp_path / "x"), "--seq-len", "300", "--context", "256"]) == 2
    assert not (tmp_path / "x").exists()

    # --draft-only: a new draft from the same target, the rest of the folder kept, the card updated
    kept = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name, _ in rows if not name.startswith("draft")}
    assert main(["train-demo", "--out", str(out), "--draft-only", "--draft-steps", "3", "--batch", "4", "--seq-len", "64",
                 "--eval-every", "0", "--threads", "1"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["draft"]["steps"] == 3 and m2["draft"]["draft_only"]["draft_steps"] == 3 and m2["target"] == m["target"]
    rows2 = re.findall(r"^\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|$", (out / "README.md").read_text(), re.MULTILINE)
    assert all(hashlib.sha256((out / name).read_bytes()).hexdigest() == digest for name, digest in rows2)
    assert all(dict(rows2)[name] == digest for name, digest in kept.items() if name != "metrics.json")
    assert dict(rows2)["draft/model.safetensors"] != dict(rows)["draft/model.safetensors"]
    assert "--draft-only --draft-steps 3" in (out / "README.md").read_text()
    assert main(["train-demo", "--out", str(tmp_path / "none"), "--draft-only"]) == 2

    # --from-draft --on-policy: the committed draft fine-tuned, partly on the target's own continuations
    draft_before = pf.load(out / "draft")[0]
    assert main(["train-demo", "--out", str(out), "--draft-only", "--from-draft", "--on-policy", "0.5",
                 "--on-policy-windows", "8", "--draft-steps", "2", "--batch", "4", "--seq-len", "64",
                 "--eval-every", "0", "--threads", "1"]) == 0
    m3 = json.loads((out / "metrics.json").read_text())
    run = m3["draft"]["draft_only"]
    assert (run["from_draft"], run["on_policy"], run["started_from"]) == (True, 0.5, m2["draft"]["draft_only"])
    assert 0.0 <= m3["draft"]["greedy_agreement_continuations"] <= 1.0
    card = (out / "README.md").read_text()
    assert ("--draft-only --draft-steps 3` (1 CPU thread(s)), then fine-tuned from that draft: `pangu train-demo "
            "--out models/demo --draft-only --draft-steps 2 --from-draft --on-policy 0.5 --on-policy-windows 8`") in card
    assert "the previous draft (see Reproduce)" in card
    draft_after = pf.load(out / "draft")[0]
    assert not torch.equal(draft_after["blocks"][0]["mlp"]["down"]["weight"],
                           draft_before["blocks"][0]["mlp"]["down"]["weight"])
    assert main(["train-demo", "--out", str(out), "--from-draft"]) == 2
    assert main(["train-demo", "--out", str(out), "--draft-only", "--on-policy", "1.5"]) == 2
