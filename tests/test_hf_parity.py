"""Logits and greedy tokens against transformers' own implementations of the two layouts."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import redraw_hf

import pangu_fn as pf
from pangu_fn.io.hf import config_from_hf, hf_to_flat
from pangu_fn.tree import unflatten

GPT2_SHAPES = [{"vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 96},
               {"vocab_size": 1000, "n_embd": 96, "n_layer": 3, "n_head": 6, "n_positions": 128, "activation_function": "gelu"},
               {"vocab_size": 257, "n_embd": 48, "n_layer": 1, "n_head": 2, "n_positions": 64, "n_inner": 80}]
LLAMA_SHAPES = [{"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "tie_word_embeddings": False},
                {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 6,
                     "num_key_value_heads": 1, "tie_word_embeddings": True, "rope_theta": 4e6},
                {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "head_dim": 48, "tie_word_embeddings": False, "rope_theta": 500.0}]


def hf_model(kind: str, shape: dict, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=1,
                                      eos_token_id=2, **shape)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=320, max_position_embeddings=256, attention_bias=True,
                                       bos_token_id=1, eos_token_id=2, **shape)
        model = transformers.LlamaForCausalLM(cfg)
    redraw_hf(model, seed)
    return model.eval()


def ours_from(model: transformers.PreTrainedModel) -> tuple[dict, pf.ModelConfig]:
    cfg = config_from_hf(model.config.to_dict())
    sd = model.state_dict()
    params = unflatten(hf_to_flat(sd.__getitem__, list(sd), cfg))
    pf.validate(params, cfg)
    return params, cfg


CASES = [("gpt2", s) for s in GPT2_SHAPES] + [("llama", s) for s in LLAMA_SHAPES]


@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_logits_and_greedy_tokens_match_transformers(kind, shape):
    model = hf_model(kind, shape, seed=len(str(shape)))
    params, cfg = ours_from(model)
    ids = torch.randint(0, cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    ours, _ = pf.forward(params, cfg, ids)
    assert (ours - ref).abs().max().item() <= 1e-4

    prompt = ids[:1, :13]
    with torch.no_grad():
        hf_out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0, attention_mask=torch.ones_like(prompt))
    ours_out = pf.generate(params, cfg, prompt.tolist(), 32, eos_token_ids=())
    assert ours_out[0].tokens == hf_out[0, 13:].tolist()


@pytest.mark.parametrize("kind,shape", [CASES[0], CASES[4]], ids=["gpt2", "llama-gqa"])
def test_load_reads_hf_folders(kind, shape, tmp_path):
    model = hf_model(kind, shape, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded, with an index
    assert list(tmp_path.glob("*.index.json"))
    params, cfg = pf.load(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    assert (pf.forward(params, cfg, ids)[0] - ref).abs().max().item() <= 1e-4
