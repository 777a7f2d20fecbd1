"""Hugging Face folders we write load in transformers (`GPT2LMHeadModel`, and
`LlamaForCausalLM` with `attention_bias` for openPangu) with the same logits, and read back
exactly. Biases and norm weights are redrawn (helpers.random_model) so those paths count."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import random_model
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.io.hf import save_hf
from pangu_fn.tree import flatten

CASES = [("tiny-gpt", {}, transformers.GPT2LMHeadModel),
         ("tiny-gpt", {"tie_embeddings": False, "activation": "gelu"}, transformers.GPT2LMHeadModel),
         ("tiny-openpangu", {}, transformers.LlamaForCausalLM),
         ("tiny-openpangu", {"tie_embeddings": False, "rope_theta": 4e6}, transformers.LlamaForCausalLM)]


@pytest.mark.parametrize("preset,changes,cls", CASES, ids=["gpt2-tied", "gpt2-untied-erf", "openpangu-tied",
                                                           "openpangu-untied"])
def test_transformers_loads_what_we_write(tmp_path, preset, changes, cls):
    params, cfg = random_model(preset, seed=7, **changes)
    save_hf(tmp_path / "hf", params, cfg, shard_size=60_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = cls.from_pretrained(tmp_path / "hf").eval()
    if cfg.family == "openpangu":
        assert model.config.attention_bias and json.loads((tmp_path / "hf" / "config.json").read_text())["bias"]
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    ours, _ = pf.forward(params, cfg, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    back, cfg2 = pf.load(tmp_path / "hf")
    assert cfg2 == cfg
    a, b = flatten(params), flatten(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_writes_hf_in_bf16(tmp_path):
    params, cfg = random_model("tiny-openpangu", seed=1)
    pf.save(tmp_path / "src", params, cfg)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    bf = pf.astype(params, torch.bfloat16)
    with torch.no_grad():
        ref = model(ids).logits
    ours, _ = pf.forward(pf.astype(bf, torch.float32), cfg, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_alpha_has_no_hf_layout(tmp_path):
    params, cfg = random_model("tiny-alpha")
    with pytest.raises(pf.ConfigError, match="gpt_pangu"):
        save_hf(tmp_path / "x", params, cfg)
    assert not (tmp_path / "x").exists()


def test_openpangu_embedded_folder_as_released(tmp_path):
    """openPangu-Embedded's own config.json (model_type PanguEmbedded, `bias` instead of
    `attention_bias`), a stray rotary inv_freq buffer, and no lm_head for the tied 1B."""
    from safetensors.torch import load_file, save_file

    params, cfg = random_model("tiny-openpangu", seed=3)
    save_hf(tmp_path / "op", params, cfg)
    conf = json.loads((tmp_path / "op" / "config.json").read_text())
    conf = {k: v for k, v in conf.items() if k not in ("attention_bias", "mlp_bias", "rope_parameters", "head_dim")}
    conf.update(model_type="PanguEmbedded", architectures=["PanguEmbeddedForCausalLM"], bias=True,
                auto_map={"AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig"})
    (tmp_path / "op" / "config.json").write_text(json.dumps(conf))
    sd = load_file(tmp_path / "op" / "model.safetensors")
    assert "lm_head.weight" not in sd
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
    save_file(sd, tmp_path / "op" / "model.safetensors")
    loaded, c = pf.load(tmp_path / "op")
    assert c == cfg
    a, b = flatten(params), flatten(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
