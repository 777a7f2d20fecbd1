"""One set of random PanGu-α weights, written by the test itself as a MindSpore `.ckpt` (byte
by byte, variants A/B/C), as the Hugging Face gpt_pangu port (`.bin` and sharded safetensors),
as the Megatron port (nested `.pt`) and as our format: all load to identical logits. Names
come from the reference tables, written out here independently of `pangu_fn.io.alpha`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_model
from mindspore_bytes import tensor_value, value, with_crc
from safetensors.torch import save_file

import pangu_fn as pf
from pangu_fn.io.checkpoint import open_source
from pangu_fn.tree import flatten

BLOCK_MS = {"attn_norm.weight": "layernorm1.gamma", "attn_norm.bias": "layernorm1.beta",
            "attn.q.weight": "attention.dense1.weight", "attn.q.bias": "attention.dense1.bias",
            "attn.k.weight": "attention.dense2.weight", "attn.k.bias": "attention.dense2.bias",
            "attn.v.weight": "attention.dense3.weight", "attn.v.bias": "attention.dense3.bias",
            "attn.o.weight": "attention.projection.weight", "attn.o.bias": "attention.projection.bias",
            "mlp_norm.weight": "layernorm2.gamma", "mlp_norm.bias": "layernorm2.beta",
            "mlp.up.weight": "output.mapping.weight", "mlp.up.bias": "output.mapping.bias",
            "mlp.down.weight": "output.projection.weight", "mlp.down.bias": "output.projection.bias"}
MS_TRANSPOSED = {"attn.o.weight", "mlp.up.weight", "mlp.down.weight"}  # Mapping weights are [in, out]
EMBED_MS = {"A": ("backbone.word_embedding.embedding_table", "backbone.position_embedding.embedding_table",
                  "backbone.top_query_embedding.embedding_table"),
            "B": ("embedding_table", "backbone.embedding.embedding.position_embedding.embedding_table",
                  "backbone.top_query_embedding_table"),
            "C": ("backbone.embedding.word_embedding.embedding_table",
                  "backbone.embedding.position_embedding.embedding_table",
                  "backbone.top_query_embedding.embedding_table")}
BLOCK_HF = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.q": "attn.q_proj", "attn.k": "attn.k_proj",
            "attn.v": "attn.v_proj", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
BLOCK_MEGATRON = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                  "attn.q": "attention.query", "attn.k": "attention.key", "attn.v": "attention.value",
                  "attn.o": "attention.dense", "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}


@pytest.fixture(scope="module")
def alpha():
    return random_model("tiny-alpha", seed=5)


def blocks_of(params, cfg):
    yield from ((f"backbone.blocks.{i}.", f"transformer.h.{i}.", f"transformer.layers.{i}.", b)
                for i, b in enumerate(params["blocks"]))
    yield "backbone.top_query_layer.", f"transformer.h.{cfg.num_layers}.", "transformer.topQueryLayer.", \
        params["query_layer"]


def mindspore_bytes(params, cfg, variant: str, training: bool = False) -> bytes:
    word, pos, query = EMBED_MS[variant]
    out = [tensor_value(word, params["tok_embed"]["weight"]), tensor_value(pos, params["pos_embed"]["weight"]),
           tensor_value(query, params["query_embed"]["weight"])]
    for ms, _, _, blk in blocks_of(params, cfg):
        flat = flatten(blk)
        for ours, name in BLOCK_MS.items():
            t = flat[ours].t() if ours in MS_TRANSPOSED else flat[ours]
            out.append(tensor_value(ms + name, t))
            if training:
                out.append(tensor_value("adam_m." + ms + name, torch.zeros_like(t)))
    out += [tensor_value("backbone.layernorm.gamma", params["final_norm"]["weight"]),
            tensor_value("backbone.layernorm.beta", params["final_norm"]["bias"])]
    if training:
        out += [value("global_step", [1], "Int32", (1234).to_bytes(4, "little")),
                value("scale_sense", [], "Float32", b"\0\0\x80\x3f"),
                value("note", [0], "str", "hi".encode("utf-32-le"))]
    return b"".join(out)


def hf_state(params, cfg) -> dict[str, torch.Tensor]:
    sd = {"transformer.wte.weight": params["tok_embed"]["weight"], "transformer.wpe.weight": params["pos_embed"]["weight"],
          "transformer.wqe.weight": params["query_embed"]["weight"],
          "transformer.ln_f.weight": params["final_norm"]["weight"], "transformer.ln_f.bias": params["final_norm"]["bias"],
          "lm_head.weight": params["tok_embed"]["weight"].clone()}
    for _, hf, _, blk in blocks_of(params, cfg):
        for ours, name in BLOCK_HF.items():
            for leaf in ("weight", "bias"):
                sd[f"{hf}{name}.{leaf}"] = flatten(blk)[f"{ours}.{leaf}"].clone()
        sd[hf + "attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.uint8))  # mask buffers in .bin files
        sd[hf + "attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def hf_config(cfg) -> dict:
    return {"model_type": "gpt_pangu", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers + 1, "num_heads": cfg.num_heads, "intermediate_size": None,
            "max_position_embeddings": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def megatron_pt(params, cfg) -> dict:
    transformer = {"final_layernorm.weight": params["final_norm"]["weight"],
                   "final_layernorm.bias": params["final_norm"]["bias"]}
    for _, _, meg, blk in blocks_of(params, cfg):
        for ours, name in BLOCK_MEGATRON.items():
            for leaf in ("weight", "bias"):
                transformer[f"{meg[len('transformer.'):]}{name}.{leaf}"] = flatten(blk)[f"{ours}.{leaf}"]
    lm = {"embedding": {"word_embeddings": {"weight": params["tok_embed"]["weight"]},
                        "position_embeddings": {"weight": params["pos_embed"]["weight"]}},
          "topQueryEmbedding": {"top_query_embeddings": {"weight": params["query_embed"]["weight"]}},
          "transformer": transformer}
    return {"model": {"language_model": lm}, "iteration": 100, "checkpoint_version": 3.0}


def logits(params, cfg):
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))  # tiny-alpha's vocabulary
    return pf.forward(params, cfg, ids)[0]


def test_all_layouts_give_identical_logits(alpha, tmp_path):
    params, cfg = alpha
    ref = logits(params, cfg)
    loaded = {}
    pf.save(tmp_path / "ours", params, cfg)
    loaded["ours"] = pf.load(tmp_path / "ours")
    for variant in "ABC":
        f = tmp_path / f"pangu_{variant}.ckpt"
        f.write_bytes(with_crc(mindspore_bytes(params, cfg, variant)))
        loaded[f"mindspore-{variant}"] = pf.load(f, config=cfg)
    (tmp_path / "bin").mkdir()
    torch.save(hf_state(params, cfg), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(hf_config(cfg)))
    loaded["gpt_pangu.bin"] = pf.load(tmp_path / "bin")
    (tmp_path / "st").mkdir()
    sd = {k: v.contiguous() for k, v in hf_state(params, cfg).items() if not k.endswith(("attn.bias", "masked_bias"))}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / "st" / fname))
    (tmp_path / "st" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "st" / "config.json").write_text(json.dumps(hf_config(cfg)))
    loaded["gpt_pangu.safetensors"] = pf.load(tmp_path / "st")
    torch.save(megatron_pt(params, cfg), tmp_path / "model_optim_rng.pt")
    loaded["megatron"] = pf.load(tmp_path / "model_optim_rng.pt", config=cfg)

    for name, (p, c) in loaded.items():
        assert c.family == "alpha" and c.num_layers == cfg.num_layers and c.query_layer, name
        assert c.tie_embeddings and c.vocab_size == cfg.vocab_size and c.num_heads == cfg.num_heads, name
        a, b = flatten(params), flatten(p)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert torch.equal(logits(p, c), ref), name


def test_mindspore_training_entries_are_skipped_and_listed(alpha, tmp_path):
    params, cfg = alpha
    f = tmp_path / "train.ckpt"
    f.write_bytes(mindspore_bytes(params, cfg, "A", training=True))
    # the head count comes from a gpt_pangu config.json beside the file
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    source = open_source(f)
    assert source.layout == "mindspore (release names)"
    assert {"global_step", "scale_sense", "note", "adam_m.backbone.blocks.0.layernorm1.gamma"} <= set(source.skipped)
    assert len(source.skipped) == 3 + 16 * (cfg.num_layers + 1)
    p, c = pf.load(f)
    assert torch.equal(logits(p, c), logits(params, cfg))


def test_unknown_and_missing_mindspore_names_are_all_reported(alpha, tmp_path):
    params, cfg = alpha
    data = mindspore_bytes(params, cfg, "A")
    data += tensor_value("backbone.blocks.0.attention.extra.weight", torch.ones(2))
    f = tmp_path / "x.ckpt"
    f.write_bytes(data)
    with pytest.raises(pf.FormatError, match=r"unexpected tensors \['backbone.blocks.0.attention.extra.weight'\]"):
        pf.load(f, config=cfg)
    f.write_bytes(mindspore_bytes(params, cfg, "A").replace(b"backbone.blocks.1.layernorm2.beta", b"backbone.blocks.1.layernorm2.betz"))
    with pytest.raises(pf.FormatError, match=r"missing tensors \['backbone.blocks.1.layernorm2.beta'\]; "
                                            r"unexpected tensors \['backbone.blocks.1.layernorm2.betz'\]"):
        pf.load(f, config=cfg)


def test_head_count_is_required_when_shapes_cannot_tell(alpha, tmp_path):
    params, cfg = alpha
    f = tmp_path / "m.ckpt"
    f.write_bytes(mindspore_bytes(params, cfg, "A"))
    with pytest.raises(pf.FormatError, match="number of attention heads cannot be read from the shapes"):
        pf.load(f)


def test_padded_vocabulary_is_kept_as_stored(alpha, tmp_path):
    params, cfg = alpha
    padded = torch.cat([params["tok_embed"]["weight"], torch.zeros(64, cfg.hidden_size)])
    f = tmp_path / "m.ckpt"
    f.write_bytes(mindspore_bytes({**params, "tok_embed": {"weight": padded}}, cfg, "A"))
    p, c = pf.load(f, config=cfg)
    assert c.vocab_size == cfg.vocab_size + 64
    assert torch.equal(logits(p, c)[..., :cfg.vocab_size], logits(params, cfg))


def test_writers_round_trip_through_every_alpha_layout(alpha, tmp_path):
    from pangu_fn.io.checkpoint import source_of
    from pangu_fn.io.writers import write_gpt_pangu, write_mindspore

    params, cfg = alpha
    src = source_of(params, cfg)
    write_mindspore(src, tmp_path / "w.ckpt")
    write_gpt_pangu(src, tmp_path / "gp", shard_size=20_000)
    d = json.loads((tmp_path / "gp" / "config.json").read_text())
    assert d["num_layers"] == cfg.num_layers + 1 and d["model_type"] == "gpt_pangu"
    assert (tmp_path / "gp" / "model.safetensors.index.json").is_file()
    for p, c in (pf.load(tmp_path / "w.ckpt", config=cfg), pf.load(tmp_path / "gp")):
        assert c == cfg
        a, b = flatten(params), flatten(p)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_megatron_writer_writes_the_ports_nested_state(alpha, tmp_path):
    from pangu_fn.io.checkpoint import source_of
    from pangu_fn.io.writers import write_megatron

    params, cfg = alpha
    write_megatron(source_of(params, cfg), tmp_path / "model_optim_rng.pt")
    written = torch.load(tmp_path / "model_optim_rng.pt", weights_only=True)

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    want = dict(leaves(megatron_pt(params, cfg)["model"]))
    got = dict(leaves(written["model"]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    p, c = pf.load(tmp_path / "model_optim_rng.pt", config=cfg)
    assert c == cfg and c.source_layout == "megatron" and torch.equal(logits(p, c), logits(params, cfg))
