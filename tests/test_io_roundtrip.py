"""save / load: exact round trips, sharding, dtype casts, atomic writes, hostile config files."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, random_model

import pangu_fn as pf
from pangu_fn.errors import FormatError
from pangu_fn.tree import flatten


@pytest.mark.parametrize("preset", FAMILIES)
def test_round_trip_is_exact(preset, tmp_path):
    params, cfg = random_model(preset)
    pf.save(tmp_path / "m", params, cfg)
    loaded, cfg2 = pf.load(tmp_path / "m")
    assert cfg2 == cfg
    a, b = flatten(params), flatten(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    params, cfg = random_model("tiny-openpangu")
    pf.save(tmp_path / "m", params, cfg, shard_size=64_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "m" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == pf.nbytes(params)
    loaded, _ = pf.load(tmp_path / "m")
    toks = torch.randint(0, cfg.vocab_size, (1, 7))
    assert torch.equal(pf.forward(params, cfg, toks)[0], pf.forward(loaded, cfg, toks)[0])


def test_untied_head_is_stored_and_tied_head_is_not(tmp_path):
    params, cfg = random_model("tiny-openpangu", tie_embeddings=False)
    pf.save(tmp_path / "untied", params, cfg)
    assert "lm_head.weight" in flatten(pf.load(tmp_path / "untied")[0])
    params, cfg = random_model("tiny-gpt")
    pf.save(tmp_path / "tied", params, cfg)
    assert "lm_head.weight" not in flatten(pf.load(tmp_path / "tied")[0])


def test_load_casts_dtype(tmp_path):
    params, cfg = random_model("tiny-gpt")
    pf.save(tmp_path / "m", params, cfg)
    loaded, _ = pf.load(tmp_path / "m", dtype="bf16")
    assert {t.dtype for t in flatten(loaded).values()} == {torch.bfloat16}


def test_failed_save_leaves_nothing_behind(tmp_path):
    params, cfg = random_model("tiny-gpt")
    bad = dict(params, final_norm={"weight": torch.ones(3), "bias": torch.zeros(3)})
    with pytest.raises(pf.ShapeError):
        pf.save(tmp_path / "m", bad, cfg)
    assert list(tmp_path.iterdir()) == []


def test_save_over_an_existing_model_replaces_it(tmp_path):
    p1, cfg = random_model("tiny-gpt", seed=1)
    p2, _ = random_model("tiny-gpt", seed=2)
    pf.save(tmp_path / "m", p1, cfg, shard_size=50_000)
    pf.save(tmp_path / "m", p2, cfg, overwrite=True)
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(pf.load(tmp_path / "m")[0]["tok_embed"]["weight"], p2["tok_embed"]["weight"])
    assert [f.name for f in tmp_path.iterdir()] == ["m"]


def test_hostile_or_unknown_folders_are_refused(tmp_path):
    params, cfg = random_model("tiny-gpt")
    pf.save(tmp_path / "m", params, cfg)
    conf = tmp_path / "m" / "config.json"
    d = json.loads(conf.read_text())
    conf.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(FormatError, match="format version 99 is newer"):
        pf.load(tmp_path / "m")
    conf.write_text("{not json")
    with pytest.raises(FormatError, match="config.json: not valid JSON"):
        pf.load(tmp_path / "m")
    conf.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(pf.PanguError, match="bert"):
        pf.load(tmp_path / "m")
    with pytest.raises(FormatError, match="expected a model folder with config.json"):
        pf.load(tmp_path / "nowhere")


def test_config_json_round_trip():
    for name, cfg in pf.PRESETS.items():
        assert pf.ModelConfig.from_json(cfg.to_json()) == cfg, name
    assert hash(pf.ModelConfig.preset("pangu-1b"))  # frozen and hashable
