"""PanGu-α as MindSpore and mindformers write and read it, against fixtures recorded with the
real upstream code (tests/fixtures/mindformers: MindSpore 2.10.0 `save_checkpoint` of
mindformers 1.3.2's `PanguAlphaHeadModel`, and that model's own logits; see make_fixtures.py).

Conversion must reproduce mindformers' logits (recorded in its float16 compute dtype, so they
are compared with a tolerance the wrong activation exceeds five-fold), and our writer must
write exactly the tensor names mindformers saved, so that mindformers' loader finds them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import random_model
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.io import alpha
from pangu_fn.io.alpha import read_mindformers_yaml
from pangu_fn.io.checkpoint import open_source, source_of
from pangu_fn.io.mindspore import CheckpointReader
from pangu_fn.io.writers import write_mindspore

FIXTURES = Path(__file__).parent / "fixtures" / "mindformers"
RECORD = json.loads((FIXTURES / "fixtures.json").read_text())
TOKENS = torch.tensor([RECORD["tokens"]])
# mindformers' hidden_act -> ours (its "gelu" is MindSpore's nn.GELU, the tanh approximation)
OURS = {"fast_gelu": "fast_gelu", "gelu": "gelu_tanh"}
# the three embedding names of each MindSpore naming (pangu-checkpoints.md), written out here
EMBEDDINGS = {
    "release": ["backbone.word_embedding.embedding_table", "backbone.position_embedding.embedding_table",
                "backbone.top_query_embedding.embedding_table"],
    "modelzoo": ["embedding_table", "backbone.embedding.embedding.position_embedding.embedding_table",
                 "backbone.top_query_embedding_table"],
    "mindformers": ["backbone.embedding.word_embedding.embedding_table",
                    "backbone.embedding.position_embedding.embedding_table",
                    "backbone.top_query_embedding.embedding_table"],
}
FILES = [(case, naming) for case in RECORD["cases"] for naming in case["files"]]
FILE_IDS = [f"{case['activation']}-{case['param_init_type']}-{naming}" for case, naming in FILES]


def run_yaml(tmp_path: Path, hidden_act: str) -> Path:
    """The committed run yaml with `hidden_act` changed."""
    d = yaml.safe_load((FIXTURES / "run_pangualpha_tiny.yaml").read_text())
    d["model"]["model_config"]["hidden_act"] = hidden_act
    f = tmp_path / f"run_{hidden_act}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def ckpt_tensors(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.read(n) for n in r.names()}


@pytest.mark.parametrize(("case", "naming"), FILES, ids=FILE_IDS)
def test_conversion_matches_mindformers_logits(case, naming, tmp_path):
    f = FIXTURES / case["files"][naming]["file"]
    act = case["activation"]
    params, cfg = pf.load(f, dtype="fp32", config=run_yaml(tmp_path, act))
    assert cfg.activation == OURS[act] and cfg.source_layout == naming
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 16, 2, 32, 64)
    ref = torch.tensor(case["logits"])
    err = (pf.forward(params, cfg, TOKENS)[0][0] - ref).abs()
    assert err.max() < 0.05 and err.mean() < 0.008, (err.max(), err.mean())
    # the fixture tells the activations apart: the other one is off by more than 0.1
    other = cfg.replace(activation="gelu_tanh" if cfg.activation == "fast_gelu" else "fast_gelu")
    assert (pf.forward(params, other, TOKENS)[0][0] - ref).abs().max() > 0.1


@pytest.mark.parametrize(("case", "naming"), FILES, ids=FILE_IDS)
def test_writer_writes_the_names_and_values_mindspore_saved(case, naming, tmp_path):
    f = FIXTURES / case["files"][naming]["file"]
    source = open_source(f, config=FIXTURES / "run_pangualpha_tiny.yaml")
    write_mindspore(source, tmp_path / "out.ckpt")  # default: the naming it was read from
    with CheckpointReader(tmp_path / "out.ckpt") as r:
        assert r.names() == case["files"][naming]["names"]
    saved, written = ckpt_tensors(f), ckpt_tensors(tmp_path / "out.ckpt")
    assert all(written[n].dtype == saved[n].dtype and torch.equal(written[n], saved[n]) for n in saved)


def test_every_naming_is_writable_and_round_trips(tmp_path):
    case = next(c for c in RECORD["cases"] if len(c["files"]) == 2)  # saved in both namings
    recorded = {naming: v["names"] for naming, v in case["files"].items()}
    original = ckpt_tensors(FIXTURES / case["files"]["mindformers"]["file"])
    source = open_source(FIXTURES / case["files"]["mindformers"]["file"], config=FIXTURES / "run_pangualpha_tiny.yaml")
    for naming, embeddings in EMBEDDINGS.items():
        out = tmp_path / f"{naming}.ckpt"
        write_mindspore(source, out, naming=naming)
        names = CheckpointReader(out).names()
        if naming in recorded:
            assert names == recorded[naming], naming
        rename = dict(zip(EMBEDDINGS["mindformers"], embeddings, strict=True))
        assert names == [rename.get(n, n) for n in recorded["mindformers"]], naming
        written = ckpt_tensors(out)
        assert all(torch.equal(written[rename.get(n, n)], t) for n, t in original.items()), naming
        again = open_source(out, config=FIXTURES / "run_pangualpha_tiny.yaml")
        assert again.cfg.source_layout == naming and again.layout == f"mindspore ({naming} names)"
        write_mindspore(again, tmp_path / f"{naming}-again.ckpt")
        assert (tmp_path / f"{naming}-again.ckpt").read_bytes() == out.read_bytes(), naming


def test_cli_keeps_the_naming_through_our_folder(tmp_path, capsys):
    case = next(c for c in RECORD["cases"] if len(c["files"]) == 2)
    src = FIXTURES / case["files"]["mindformers"]["file"]
    config = run_yaml(tmp_path, case["activation"])
    assert main(["convert", str(src), str(tmp_path / "ours"), "--config", str(config), "--verify"]) == 0
    err = capsys.readouterr().err
    assert "mindspore (mindformers names)" in err and f"note: activation {OURS[case['activation']]} from the config" in err
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["config"]["source_layout"] == "mindformers"
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.ckpt")]) == 0
    assert "mindspore, mindformers names" in capsys.readouterr().err
    assert CheckpointReader(tmp_path / "back.ckpt").names() == case["files"]["mindformers"]["names"]
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "release.ckpt"), "--layout", "release"]) == 0
    assert CheckpointReader(tmp_path / "release.ckpt").names() == case["files"]["release"]["names"]
    assert main(["convert", str(src), str(tmp_path / "x"), "--config", str(config), "--layout", "release"]) == 2
    assert "--layout 'release' names MindSpore tensors" in capsys.readouterr().err


def test_mindformers_run_yaml_gives_the_config(tmp_path):
    cfg = read_mindformers_yaml(FIXTURES / "run_pangualpha_tiny.yaml")
    mc = RECORD["config"]
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == ("alpha", 2, 16, 2, 8)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_seq_len) == (32, 64, 16)
    assert (cfg.activation, cfg.norm_eps, cfg.query_layer, cfg.tie_embeddings) == ("fast_gelu", 1e-5, True, True)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (mc["pad_token_id"], mc["eos_token_id"])
    assert read_mindformers_yaml(run_yaml(tmp_path, "gelu")).activation == "gelu_tanh"
    d = yaml.safe_load((FIXTURES / "run_pangualpha_tiny.yaml").read_text())
    d["model"]["model_config"]["layernorm_epsilon"] = 1e-6
    (tmp_path / "eps.yaml").write_text(yaml.safe_dump(d))
    assert read_mindformers_yaml(tmp_path / "eps.yaml").norm_eps == 1e-6
    bad = [("hidden_act", "relu", "hidden_act: expected one of"), ("post_layernorm_residual", True, "post_layernorm"),
           ("type", "LlamaConfig", "expected PanguAlphaConfig"), ("num_heads", 3, "expected a divisor of hidden_size 16"),
           ("num_heads", "2", "num_heads: expected a positive integer, found '2'"), ("hidden_size", 16.5, "positive integer"),
           ("num_layers", 1, "at least 2"), ("eos_token_id", -1, "eos_token_id: expected a token id"),
           ("layernorm_epsilon", "1e-5", "layernorm_epsilon: expected a number")]
    for key, value, message in bad:
        d = yaml.safe_load((FIXTURES / "run_pangualpha_tiny.yaml").read_text())
        d["model"]["model_config"][key] = value
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d))
        with pytest.raises(pf.ConfigError, match=message):
            read_mindformers_yaml(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(pf.ConfigError, match="broken.yaml: expected a mindformers yaml"):
        read_mindformers_yaml(tmp_path / "broken.yaml")
    (tmp_path / "other.yaml").write_text("seed: 0\nmodel:\n  arch: {type: LlamaForCausalLM}\n")
    with pytest.raises(pf.ConfigError, match="other.yaml: expected a mindformers run config with a model.model_config"):
        read_mindformers_yaml(tmp_path / "other.yaml")


@pytest.mark.parametrize(("naming", "assumed"), [("mindformers", "fast_gelu"), ("release", "gelu_tanh")])
def test_reader_says_which_activation_it_assumed(naming, assumed, tmp_path, monkeypatch):
    params, cfg = random_model("tiny-alpha", seed=2)
    write_mindspore(source_of(params, cfg), tmp_path / "m.ckpt", naming=naming)
    monkeypatch.setitem(alpha.KNOWN_HEADS, cfg.hidden_size, cfg.num_heads)  # as for the released sizes
    source = open_source(tmp_path / "m.ckpt")
    assert source.cfg.activation == assumed and source.cfg.num_heads == cfg.num_heads
    assert len(source.notes) == 1 and f"activation {assumed} assumed" in source.notes[0]
    explicit = open_source(tmp_path / "m.ckpt", config=cfg.replace(activation="gelu"))
    assert explicit.cfg.activation == "gelu" and "from the config given" in explicit.notes[0]
    p, c = pf.load(tmp_path / "m.ckpt", config=cfg)
    assert c == cfg and torch.equal(pf.forward(p, c, TOKENS)[0], pf.forward(params, cfg, TOKENS)[0])


def test_fast_gelu_matches_transformers_quick_gelu(tmp_path):
    """Our fast_gelu through the whole forward against transformers' GPT-2 with quick_gelu
    (x * sigmoid(1.702 x)), written and read back through the HF layout."""
    transformers = pytest.importorskip("transformers")
    params, cfg = random_model("tiny-gpt", seed=4, activation="fast_gelu")
    from pangu_fn.io.hf import save_hf

    save_hf(tmp_path / "hf", params, cfg)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "quick_gelu"
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    ours = pf.forward(params, cfg, ids)[0]
    assert (ours - ref).abs().max() < 1e-4
    assert (pf.forward(params, cfg.replace(activation="gelu_tanh"), ids)[0] - ref).abs().max() > 1e-3
    assert pf.load(tmp_path / "hf")[1].activation == "fast_gelu"


def test_fast_gelu_exports_for_ascend(tmp_path):
    """fast_gelu lowers to Sigmoid and Mul: the Ascend (ATC) profile accepts the graph and
    ONNX Runtime computes forward's logits from it."""
    from pangu_export import check_ascend, export_bundle
    from pangu_runtime import Session

    params, cfg = random_model("tiny-alpha", seed=6, activation="fast_gelu")
    export_bundle(params, cfg, tmp_path / "b", "ascend", batch_size=1, kv_len=32, prefill_lengths=[1, 16],
                  progress=False)
    assert check_ascend(tmp_path / "b" / "model.onnx") == []
    prompt = RECORD["tokens"][:9]
    with torch.no_grad():
        ref = pf.forward(params, cfg, torch.tensor([prompt]))[0][0].numpy()
        off = pf.forward(params, cfg.replace(activation="gelu_tanh"), torch.tensor([prompt]))[0][0].numpy()
    got = Session(tmp_path / "b").logits([prompt])[0]
    assert abs(got - ref).max() < 1e-4 < abs(got - off).max()


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="a second export (~20 s); set PANGU_SLOW_TESTS=1")
def test_fast_gelu_runs_in_onnxruntime_genai(tmp_path):
    """onnxruntime-genai runs our ONNX decoder as it is (genai_config.json declares names and
    sizes only), so fast_gelu needs nothing from its builder: greedy tokens equal generate's."""
    pytest.importorskip("onnxruntime_genai")
    from pangu_export import export_bundle
    from test_export_genai import genai_greedy

    params, cfg = random_model("tiny-alpha", seed=6, activation="fast_gelu")
    export_bundle(params, cfg, tmp_path / "b", "ort", progress=False)
    prompt = RECORD["tokens"][:9]
    assert genai_greedy(tmp_path / "b", prompt, 16) == pf.generate(params, cfg, [prompt], 16, eos_token_ids=())[0].tokens
