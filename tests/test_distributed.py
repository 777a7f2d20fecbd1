"""Tensor parallelism on gloo: the sharded model against the same model in one process.

Spawning a process group costs seconds (torch imports in every process), so each spawned test
runs one worker that makes many checks and returns their numbers; the assertions run here.
The reference is always the unsharded tree in the same process (forward, generate, stream,
speculative decoding), so a check fails when a rank's part, a collective or the sharding
rules are wrong. Tests that need no process group (sizes, bad world sizes) run in-process.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import random_model

import pangu_fn as pf
from pangu_fn import native, native_step
from pangu_fn.distributed import RankFailed, launch, leaves, load_shard, shard, split_plan, valid_world_sizes
from pangu_fn.distributed.leaves import GATHER_BYTES, _Parallel
from pangu_fn.distributed.plan import kv_heads_for
from pangu_fn.errors import ConfigError
from pangu_fn.tree import flatten, nbytes

TOL = 1e-5
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3, 50], [64, 65, 66, 67]]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| over the scale of the values (the logits of these redrawn models reach tens)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()


def _logit_checks(params, cfg, sharded) -> dict[str, float]:
    """Max |logit difference| of the sharded tree against `params`: causal scoring, a ragged
    prefill, three decode steps, and decoding again after a rollback of two positions."""
    out = {}
    tokens = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.inference_mode():
        out["no_cache"] = _max_diff(pf.forward(params, cfg, tokens)[0], pf.forward(sharded, cfg, tokens)[0])
        caches = [pf.init_cache(p, cfg, 2, 24) for p in (params, sharded)]
        lengths = torch.tensor([7, 4])
        for name, step in [("prefill", tokens), ("decode1", tokens[:, :1]), ("decode2", tokens[:, 1:2]),
                           ("decode3", tokens[:, 2:3]), ("after_rollback", tokens[:, 3:5])]:
            results = []
            for i, p in enumerate((params, sharded)):
                logits, caches[i] = pf.forward(p, cfg, step, caches[i])
                if name == "prefill":
                    caches[i] = caches[i].with_lengths(lengths)  # ragged: row 1 keeps 4 of its 7 tokens
                if name == "decode3":
                    caches[i] = caches[i].rollback([2, 2])
                results.append(logits)
            out[name] = _max_diff(*results)
    return out


def _token_checks(params, cfg, sharded) -> dict[str, bool]:
    sampled = pf.SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    out = {}
    for name, sp in [("greedy", pf.SamplingParams()), ("sampled", sampled)]:
        ref = pf.generate(params, cfg, PROMPTS, 10, sp, seed=3, eos_token_ids=())
        got = pf.generate(sharded, cfg, PROMPTS, 10, sp, seed=3, eos_token_ids=())
        out[f"generate_{name}"] = [c.tokens for c in ref] == [c.tokens for c in got]
    events = list(pf.stream(params, cfg, PROMPTS[:2], 6, sampled, seed=1))
    out["stream"] = events == list(pf.stream(sharded, cfg, PROMPTS[:2], 6, sampled, seed=1))
    return out


def _family_models() -> dict[str, tuple[dict, pf.ModelConfig]]:
    return {"gpt_tied": random_model("tiny-gpt", seed=1),
            "gpt_untied": random_model("tiny-gpt", seed=2, tie_embeddings=False),
            "alpha": random_model("tiny-alpha", seed=3),
            "openpangu_untied": random_model("tiny-openpangu", seed=4, tie_embeddings=False)}


def two_rank_checks(rank: int, world: int, folder: str, others: dict) -> dict:
    """Everything the 2-rank group checks: loading a rank's slices of `folder` (first, while
    the peak RSS is that of the imports) and its part of checkpoints in other layouts
    (`others`: {name: (path, config or None)}), logits and tokens of every family, quantized
    trees both ways round, a pruned tree, speculative decoding and a compiled decode step."""
    out: dict = {"load": load_and_measure(rank, world, folder)}
    tokens = torch.tensor([PROMPTS[0]])
    for name, (path, config) in others.items():
        full, cfg = pf.load(path, config=config)
        with torch.inference_mode():
            out[f"load_{name}"] = _max_diff(pf.forward(load_shard(path, rank, world, config=config)[0], cfg, tokens)[0],
                                            pf.forward(full, cfg, tokens)[0])
    for name, (params, cfg) in _family_models().items():
        sharded = shard(params, cfg, rank, world)
        out[name] = {**_logit_checks(params, cfg, sharded), **_token_checks(params, cfg, sharded)}
        if native.step_library() is not None:  # those decode steps ran the fused step, summing over the ranks
            plan = native_step.plan(sharded, cfg)
            out[name]["fused_step_sums_over_ranks"] = plan is not None and plan.reduces

    params, cfg = random_model("tiny-openpangu", seed=5)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        exact = pf.forward(params, cfg, tokens)[0]
        for scheme in ("int8", "int4"):
            recipe = pf.QuantRecipe(scheme=scheme, group_size=32, compute_dtype="fp32", prepack=False)
            quantized = pf.quantize(params, recipe)
            ref = pf.forward(quantized, cfg, tokens)[0]
            then_shard = pf.forward(shard(quantized, cfg, rank, world), cfg, tokens)[0]
            shard_then = pf.forward(pf.quantize(shard(params, cfg, rank, world), recipe), cfg, tokens)[0]
            out[scheme] = {"quantize_then_shard": _max_diff(then_shard, ref),
                           "shard_then_quantize": _max_diff(shard_then, ref),
                           "shard_then_quantize_error": _max_diff(shard_then, exact),
                           "quantize_error": _max_diff(ref, exact)}

    recipe = pf.PruneRecipe(method="structured", remove_heads={0: (1,)}, remove_neurons={1: tuple(range(0, 128, 2))})
    pruned, _ = pf.prune(params, recipe, cfg=cfg)
    out["pruned"] = _logit_checks(pruned, cfg, shard(pruned, cfg, rank, world))

    draft, draft_cfg = random_model("tiny-openpangu", seed=6, num_layers=1)
    sharded = shard(params, cfg, rank, world)
    plain = pf.generate(params, cfg, PROMPTS, 12, eos_token_ids=())
    spec = pf.speculative_generate(sharded, cfg, PROMPTS, 12, eos_token_ids=(), drafter=(draft, draft_cfg), k=3)
    out["speculative_greedy_equal"] = [c.tokens for c in plain] == [c.tokens for c in spec]

    out["greedy_gathered"], out["ties"] = _greedy_gathers(sharded, cfg, rank, world)

    cache = pf.init_cache(sharded, cfg, 1, 16)
    with torch.inference_mode():
        _, cache = pf.forward(sharded, cfg, tokens, cache)
        step = torch.compile(lambda t, c: pf.forward(sharded, cfg, t, c)[0], backend="eager", fullgraph=True)
        compiled = step(tokens[:, :1], cache.clone())
        eager = pf.forward(sharded, cfg, tokens[:, :1], cache.clone())[0]
    out["compiled_decode_step"] = _max_diff(compiled, eager)
    return out


def _greedy_gathers(sharded, cfg, rank: int, world: int) -> tuple[int, list]:
    """(values all-gathered while greedy decoding 2 rows for 6 tokens, argmax of hand-made
    logits whose maximum lies on rank 1, then is tied across ranks)."""
    import pangu_fn.distributed.logits as sharded_logits

    gathered, plain = [0], sharded_logits.all_gather_last

    def counting(x, group):
        gathered[0] += x.numel()
        return plain(x, group)

    sharded_logits.all_gather_last = counting
    try:
        pf.generate(sharded, cfg, PROMPTS[:2], 6, eos_token_ids=())
    finally:
        sharded_logits.all_gather_last = plain
    half = cfg.vocab_size // world
    local = torch.zeros(2, half)
    local[0, 3] = 1.0 if rank == 1 else 0.5  # row 0: the maximum is id half + 3, on rank 1
    local[1, 7] = 2.0  # row 1: tied between id 7 and id half + 7; the first wins
    logits = sharded_logits.ShardedLogits(local, rank * half, half, cfg.vocab_size, torch.distributed.group.WORLD)
    return gathered[0], logits.max(-1).indices.tolist()


def test_two_ranks_equal_one_process(tmp_path):
    from pangu_fn.io.checkpoint import source_of
    from pangu_fn.io.hf import save_hf
    from pangu_fn.io.writers import write_mindspore

    total = big_checkpoint(tmp_path / "m")
    save_hf(tmp_path / "hf", *random_model("tiny-openpangu", seed=11, tie_embeddings=False), shard_size=40_000)
    save_hf(tmp_path / "gpt2", *random_model("tiny-gpt", seed=12))  # fused, transposed: read whole, then cut
    alpha, alpha_cfg = random_model("tiny-alpha", seed=13)
    write_mindspore(source_of(alpha, alpha_cfg), tmp_path / "alpha.ckpt")
    others = {"hf_llama_sliced": (str(tmp_path / "hf"), None), "hf_gpt2": (str(tmp_path / "gpt2"), None),
              "mindspore": (str(tmp_path / "alpha.ckpt"), alpha_cfg)}
    results = launch(two_rank_checks, 2, str(tmp_path / "m"), others, threads=1)
    for name in others:
        assert all(r[f"load_{name}"] <= TOL for r in results), name
    for r in results:  # each rank loaded its slices only: its peak stays near its half
        assert r["load"]["diff"] <= TOL
        assert r["load"]["bytes"] < 0.55 * total
        if r["load"]["peak"] is not None:  # it sees the rank's part, never the whole
            assert r["load"]["bytes"] * 0.9 <= r["load"]["peak"] < 0.75 * total, (r["load"], total)
    for family in _family_models():
        for r in results:  # every rank returns the same tokens and logits
            for check, value in r[family].items():
                assert value is True or (not isinstance(value, bool) and value <= TOL), (family, check, value)
    r0 = results[0]
    for scheme in ("int8", "int4"):
        assert r0[scheme]["quantize_then_shard"] <= TOL, r0[scheme]
        if scheme == "int4":  # groups lie inside one rank's inputs: the same codes and scales
            assert r0[scheme]["shard_then_quantize"] <= TOL, r0[scheme]
        else:  # int8 scales of a row-parallel weight come from the rank's own columns
            assert r0[scheme]["shard_then_quantize_error"] <= 1.5 * r0[scheme]["quantize_error"] + TOL, r0[scheme]
    assert max(r0["pruned"].values()) <= TOL, r0["pruned"]
    assert r0["speculative_greedy_equal"]
    assert r0["compiled_decode_step"] <= TOL
    assert r0["greedy_gathered"] == 6 * 2 * 2  # one (value, index) pair per row and step, no vocabulary
    assert r0["ties"] == [128 + 3, 7]


def hanging_decode(rank: int, world: int) -> None:
    params, cfg = random_model("tiny-gpt")
    sharded = shard(params, cfg, rank, world)
    for i, _ in enumerate(pf.stream(sharded, cfg, PROMPTS[:1], 50, eos_token_ids=())):
        if rank == 1 and i == 3:
            time.sleep(600)  # alive but silent: rank 0's next collective must time out


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="waits for a 10 s timeout; set PANGU_SLOW_TESTS=1")
def test_a_silent_rank_times_the_others_out_and_is_stopped():
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        launch(hanging_decode, 2, threads=1, timeout_s=10)
    assert time.monotonic() - start < 120  # startup, the 10 s timeout, 5 s of grace, then stopped
    assert all(code not in (0, None) for code in info.value.exit_codes), info.value.exit_codes


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM) since the last `_reset_peak_rss`. Not ru_maxrss: a
    spawned rank's carries the forking pytest process's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_and_measure(rank: int, world: int, folder: str) -> dict:
    """Rank's slices of `folder`: their bytes, how far the peak RSS grew while loading and
    reading them (None without Linux's /proc counters), and their logits' distance from the
    whole model's."""
    linux = os.path.exists("/proc/self/clear_refs")
    if linux:
        _reset_peak_rss()
    before = _peak_rss() if linux else 0
    params, cfg = load_shard(folder, rank, world)
    for leaf in pytree.tree_leaves(params):  # read every byte (an mmap-backed slice becomes resident)
        (leaf.local if isinstance(leaf, _Parallel) else leaf).sum()
    peak = _peak_rss() - before if linux else None
    full, _ = pf.load(folder)
    with torch.inference_mode():
        diff = _max_diff(pf.forward(full, cfg, torch.tensor([PROMPTS[0]]))[0],
                         pf.forward(params, cfg, torch.tensor([PROMPTS[0]]))[0])
    return {"peak": peak, "bytes": nbytes(params), "diff": diff}


def big_checkpoint(folder) -> int:
    """A model of ~100 MB of fp32 (mostly its 24000-row embedding and head) saved as several
    files plus an index; returns the bytes stored."""
    cfg = pf.ModelConfig.preset("tiny-gpt").replace(vocab_size=24000, hidden_size=512, num_heads=8,
                                                    num_kv_heads=8, head_dim=64, intermediate_size=1024,
                                                    tie_embeddings=False)
    pf.save(folder, pf.init_params(cfg, seed=0), cfg, shard_size=30 * 2**20)
    assert (folder / "model.safetensors.index.json").is_file()
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _three_rank_models() -> dict[str, tuple[dict, pf.ModelConfig]]:
    """6 query heads; the openPangu one has 2 KV heads, which 3 ranks cannot split (replicated);
    vocab 250 is not a multiple of 3 (the last rank's rows are padded)."""
    return {"gpt": random_model("tiny-gpt", seed=7, hidden_size=48, num_heads=6, num_kv_heads=6, head_dim=8,
                                intermediate_size=96, vocab_size=250, tie_embeddings=False),
            "alpha": random_model("tiny-alpha", seed=8, hidden_size=48, num_heads=6, num_kv_heads=6, head_dim=8,
                                  intermediate_size=96, vocab_size=250),
            "openpangu_gqa": random_model("tiny-openpangu", seed=9, num_heads=6, num_kv_heads=2, head_dim=8,
                                          intermediate_size=96, vocab_size=250)}


def three_rank_checks(rank: int, world: int) -> dict:
    out = {name: {**_logit_checks(params, cfg, sharded := shard(params, cfg, rank, world)),
                  **_token_checks(params, cfg, sharded)}
           for name, (params, cfg) in _three_rank_models().items()}
    sums = {}  # the leaves' sum both ways: gathered and added (small), all-reduced in place (large)
    for way, numel in (("gathered", 1536), ("all_reduced", GATHER_BYTES // 4 + 1)):
        x = torch.arange(numel, dtype=torch.float32) * (rank + 1)
        sums[way] = (leaves.all_reduce(x, None) - torch.arange(numel) * 6).abs().max().item()  # 1 + 2 + 3
    out["all_reduce"] = sums
    return out


def test_three_ranks_replicated_kv_heads_and_padded_vocab():
    results = launch(three_rank_checks, 3, threads=1)
    for family, checks in results[0].items():
        for check, value in checks.items():
            assert value is True or (not isinstance(value, bool) and value <= TOL), (family, check, value)


def test_rank_bytes_are_a_share_of_the_sharded_tensors_plus_the_replicated_rest():
    params, cfg = random_model("tiny-openpangu", seed=1)  # 4 query / 2 KV heads, tied, vocab 256
    flat = flatten(params)
    size = {n: t.numel() * t.element_size() for n, t in flat.items()}
    replicated = sum(s for n, s in size.items() if "norm" in n or n.endswith(("o.bias", "down.bias")))
    kv = sum(s for n, s in size.items() if ".attn.k." in n or ".attn.v." in n)
    split = sum(size.values()) - replicated - kv
    for world in (2, 4):
        for rank in range(world):
            # one KV head of two a rank: TP 2 splits them; at TP 4 a rank's one query head reads one
            assert nbytes(shard(params, cfg, rank, world)) == split // world + kv // 2 + replicated
    assert kv_heads_for(4, 2, 3, 4) == [1]
    assert kv_heads_for(12, 6, 1, 4) == [1, 2, 2]  # openPangu-1B at TP 4: query heads 3, 4, 5
    assert kv_heads_for(6, 2, 1, 3) == [0, 1] and kv_heads_for(6, 2, 0, 3) == [0]


def test_bad_world_sizes_name_the_valid_ones():
    params, cfg = random_model("tiny-gpt")
    with pytest.raises(ConfigError, match=r"valid sizes: \[1, 2, 4\]"):
        shard(params, cfg, 0, 3)
    with pytest.raises(ConfigError, match="rank in"):
        shard(params, cfg, 2, 2)
    one_b = pf.init_params(pf.ModelConfig.preset("openpangu-embedded-1b"), device="meta")
    shapes = {n: tuple(t.shape) for n, t in flatten(one_b).items()}
    assert valid_world_sizes(shapes, pf.ModelConfig.preset("openpangu-embedded-1b")) == [1, 2, 3, 4, 6, 12]
    plan = split_plan(shapes, pf.ModelConfig.preset("openpangu-embedded-1b"), 1, 4)
    assert plan["blocks.0.attn.k.weight"].ranges == ((128, 384), (256, 384))  # KV heads 1, 2, 2
    with pytest.raises(ConfigError, match="split a group"):
        shard(pf.quantize(params, pf.QuantRecipe(scheme="int4", group_size=64)), cfg, 0, 2)  # o: 32 inputs a rank


def test_init_outside_torchrun_or_launch_names_what_is_missing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"missing \['RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        pf.distributed.init()
    with pytest.raises(ConfigError, match="no collective backend"):
        pf.distributed.backend_for("meta")
    assert [pf.distributed.backend_for(d) for d in ("cpu", "cuda", "npu")] == ["gloo", "nccl", "hccl"]


def failing_decode(rank: int, world: int) -> None:
    params, cfg = random_model("tiny-gpt")
    sharded = shard(params, cfg, rank, world)
    for i, _ in enumerate(pf.stream(sharded, cfg, PROMPTS[:1], 50, eos_token_ids=())):
        if rank == 1 and i == 3:
            raise RuntimeError("boom on rank 1 during decode")


def test_a_rank_raising_during_decode_stops_every_rank(capfd):
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 of 2") as info:
        launch(failing_decode, 2, threads=1)
    assert time.monotonic() - start < 60
    assert all(code not in (0, None) for code in info.value.exit_codes), info.value.exit_codes
    assert "boom on rank 1 during decode" in capfd.readouterr().err


def test_cli_generate_tp_2_equals_one_process(capfd):
    import json

    from pangu_tools.cli import main

    args = ["generate", "--model", "tiny-openpangu", "--prompt-ids", "5 6 7; 9 1", "--max-new-tokens", "6",
            "--no-eos", "--json"]
    assert main(args) == 0
    single = capfd.readouterr().out
    assert main([*args, "--tp", "2"]) == 0  # two ranks; only rank 0 writes to stdout
    assert json.loads(capfd.readouterr().out)["completions"] == json.loads(single)["completions"]
    assert main(["generate", "--model", "tiny-openpangu", "--prompt-ids", "5", "--tp", "3"]) == 2
    assert "valid sizes: [1, 2, 4]" in capfd.readouterr().err


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="two more ranks (~10 s of CPU); set PANGU_SLOW_TESTS=1")
def test_bench_tp_rows_and_ratios(tmp_path):
    import json

    from pangu_tools.cli import main

    out = tmp_path / "tp.json"
    assert main(["bench", "--model", "tiny-openpangu", "--tp", "2", "--threads", "2", "--new-tokens", "4",
                 "--prompt-len", "8", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    single, sharded = result["results"]
    tp = result["tensor_parallel"]
    assert (single["engine"], single["threads"], sharded["engine"], sharded["threads"]) == \
        ("pangu-fn tp=1", 2, "pangu-fn tp=2", 1)
    assert tp["decode_tp_vs_single"] == round(sharded["decode_tok_s"] / single["decode_tok_s"], 3)
    layers = pf.ModelConfig.preset("tiny-openpangu").num_layers  # a block's two all-reduces, the embedding's, the greedy pair
    assert sharded["collectives_per_call"] == 2 * layers + 2 and 0 < sharded["collective_share"] < 1
    assert sharded["all_reduce_us"] > 0
    assert len(tp["rank_peak_rss_mb"]) == 2 and all(r > 0 for r in tp["rank_peak_rss_mb"])
    for ratio, rank_mb in zip(tp["rank_peak_rss_vs_single"], tp["rank_peak_rss_mb"]):  # MB are rounded
        assert abs(ratio - rank_mb / tp["single_peak_rss_mb"]) < 0.01


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="three more processes (~12 s of CPU); set PANGU_SLOW_TESTS=1")
def test_readme_example_runs_and_every_rank_gets_the_single_process_tokens(tmp_path):
    import ast
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```python tp\n") + len("```python tp\n")
    (tmp_path / "tp_example.py").write_text(readme[start:readme.index("```", start)])
    run = subprocess.run([sys.executable, "tp_example.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=240, check=False)
    assert run.returncode == 0, run.stderr
    cfg = pf.ModelConfig.preset("tiny-openpangu")
    single = pf.generate(pf.init_params(cfg, seed=0), cfg, [[1, 5, 9]], max_new_tokens=8)[0].tokens
    assert ast.literal_eval(run.stdout.strip()) == [single, single]


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="two more ranks (~8 s); set PANGU_SLOW_TESTS=1")
def test_allreduce_latency_tool_sums_every_way_and_writes_its_rows(tmp_path):
    from pangu_tools import allreduce_latency

    out = tmp_path / "latency.json"
    assert allreduce_latency.main(["--numel", "64", "--calls", "3", "--rounds", "2", "--transports", "TCP",
                                   "--dtypes", "fp32,bf16", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]  # each rank checked every method's sum against its own
    assert len(rows) == len(allreduce_latency.METHODS) * 2 * 2  # methods x dtypes x peers
    assert all(r["median_us"] > 0 and r["step_us"] >= r["cost_us"] for r in rows)
    assert {r["vs_base"] for r in rows if r["method"] == "c10d"} == {1.0}


@pytest.mark.parametrize("column_major", [False, True])
def test_load_shard_lays_each_part_out_as_shard_of_load_does(tmp_path, monkeypatch, column_major):
    """Values, dtypes and strides equal `shard(load(...))`'s, with fp32 matrices row-major (the
    native fp32 kernel's layout) and column-major (filled from slabs where that kernel is off);
    padded vocabularies and replicated KV heads (TP 4) take several ranges per tensor."""
    from pangu_fn import params as params_module
    from pangu_fn.distributed import load as load_module
    from pangu_fn.io.checkpoint import source_of
    from pangu_fn.io.writers import write_mindspore

    for module in (params_module, load_module):
        monkeypatch.setattr(module, "column_major_fp32", lambda: column_major)
    gpt, gpt_cfg = random_model("tiny-gpt", seed=3, vocab_size=250, tie_embeddings=False)
    pf.save(tmp_path / "gpt", gpt, gpt_cfg)
    pf.save(tmp_path / "openpangu", *random_model("tiny-openpangu", seed=4))  # tied; 2 KV heads
    alpha, alpha_cfg = random_model("tiny-alpha", seed=5)
    write_mindspore(source_of(alpha, alpha_cfg), tmp_path / "alpha.ckpt")
    for path, config, world in [(tmp_path / "gpt", None, 4), (tmp_path / "openpangu", None, 4),
                                (tmp_path / "alpha.ckpt", alpha_cfg, 2)]:
        for dtype in (None, "bf16"):
            whole, cfg = pf.load(path, config=config, dtype=dtype)
            for rank in range(world):
                want = flatten(shard(whole, cfg, rank, world))
                got = flatten(load_shard(path, rank, world, dtype=dtype, config=config)[0])
                assert got.keys() == want.keys()
                for name, leaf in got.items():
                    a = leaf.local if isinstance(leaf, _Parallel) else leaf
                    b = want[name].local if isinstance(want[name], _Parallel) else want[name]
                    assert torch.equal(a, b) and a.dtype == b.dtype and a.stride() == b.stride(), (path, name)
    assert flatten(load_shard(tmp_path / "gpt", 3, 4)[0])["lm_head.weight"].local.t().is_contiguous() == column_major
