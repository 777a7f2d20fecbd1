"""Compiled decoding (pangu_fn.compiled) against eager decoding: the same greedy tokens, logits
within the dtype's rounding, for all three families, ragged batches, quantized and bf16 trees
and speculative decoding.

Most checks compile with torch.compile's "eager" backend: dynamo traces the same fullgraph
programs (static cache, tensor lengths, scatter writes, custom ops for the native kernels)
without generating code, so they cost seconds. One inductor test (C++ code generation, about
a minute here) runs when PANGU_SLOW_TESTS is set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import FAMILIES, random_model

import pangu_fn as pf
from pangu_fn import aot, compiled
from pangu_fn.sampling import greedy_tokens

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
EAGER = compiled.CompileOptions(backend="eager")


def decode_both(params, cfg, prompts, steps, opts=EAGER):
    """Teacher-forced on the eager tokens: per step (eager logits [B, V], compiled logits,
    compiled greedy tokens), prefill included as step 0."""
    B, T = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(B, T, dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    out = []
    with torch.inference_mode():
        cache = pf.init_cache(params, cfg, B, T + steps)
        logits, cache = pf.forward(params, cfg, tokens, cache, logits_index=lengths - 1)
        cache = cache.with_lengths(lengths)
        eager = logits[:, 0]
        progs = compiled.programs(params, cfg, opts)
        ccache = compiled.static_cache(params, cfg, B, T + steps, opts)
        got, ccache = compiled.prefill(progs, params, prompts, ccache)
        out.append((eager, got, greedy_tokens(got)))
        for _ in range(steps):
            tok = greedy_tokens(eager)
            logits, cache = pf.forward(params, cfg, tok[:, None], cache)
            eager = logits[:, -1]
            got, got_tok, ccache = progs.decode(params, tok, ccache)
            out.append((eager, got, got_tok))
    assert ccache.lengths.tolist() == (lengths + steps).tolist()
    return out


def assert_close_and_same_argmax(steps, rel):
    """Logits within `rel` of the largest eager logit; the same argmax wherever the eager top two
    are further apart than twice that."""
    for i, (eager, got, got_tok) in enumerate(steps):
        tol = rel * max(1.0, eager.float().abs().max().item())
        err = (eager.float() - got.float()).abs().max().item()
        assert err <= tol, f"step {i}: logits differ by {err} (tolerance {tol})"
        top2 = eager.float().topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol  # rows whose argmax rounding cannot flip
        assert torch.equal(got_tok[clear], greedy_tokens(eager)[clear]), f"step {i}: greedy tokens differ"


@pytest.mark.parametrize("preset", FAMILIES)
def test_compiled_decode_matches_eager(preset):
    params, cfg = random_model(preset)
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS, 6), 1e-4)
    eager = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=())
    got = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=(), compile=EAGER)  # the same programs
    assert [c.tokens for c in got] == [c.tokens for c in eager]


@pytest.mark.parametrize("tree", ["bf16", "bf16-leaves", "int8", "int4"])
def test_compiled_decode_of_reduced_precision_trees(tree):
    params, cfg = random_model("tiny-openpangu", num_layers=1)  # one block: half the tracing
    if tree == "bf16":  # plain bf16 tensors: compiled graphs call the native bf16 kernel as a custom op
        params = pf.astype(params, torch.bfloat16)
    elif tree == "bf16-leaves":
        params = pf.quantize(params, pf.QuantRecipe(scheme="bf16"))
    else:
        params = pf.quantize(params, pf.QuantRecipe(scheme=tree, group_size=32))
    # bf16 activations: compiled attention stays bf16 where eager upcasts few queries to fp32
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS[:2], 4), 2e-2)


def test_stream_compiled_sampling_matches_eager():
    params, cfg = random_model("tiny-gpt")
    sp = pf.SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2)
    eager = list(pf.stream(params, cfg, PROMPTS, 5, sp, seed=3, eos_token_ids=(3,)))
    got = list(pf.stream(params, cfg, PROMPTS, 5, sp, seed=3, eos_token_ids=(3,), compile=EAGER))
    assert got == eager


def test_speculative_compiled_equals_greedy():
    params, cfg = random_model("tiny-openpangu")
    eager = pf.generate(params, cfg, PROMPTS[:2], 8, eos_token_ids=())
    got = pf.speculative_generate(params, cfg, PROMPTS[:2], 8, eos_token_ids=(), drafter="self", k=2,
                                  compile=EAGER)
    assert [c.tokens for c in got] == [c.tokens for c in eager]


def test_greedy_stop_check_cuts_rows_after_eos():
    params, cfg = random_model("tiny-gpt")
    eager = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=())
    eos = eager[1].tokens[2]  # row 1 stops at its third token (others where that token appears)
    want = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=(eos,))
    got = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=(eos,), compile=EAGER)
    assert got == want and got[1].finish_reason == "eos"


def test_bad_compile_argument_is_a_config_error():
    params, cfg = random_model("tiny-gpt")
    with pytest.raises(pf.ConfigError, match="backend"):
        pf.generate(params, cfg, PROMPTS, 2, compile="tvm")
    with pytest.raises(pf.ConfigError, match="expected a bool"):
        pf.generate(params, cfg, PROMPTS, 2, compile=3)


def test_buckets_hold_the_positions_needed():
    cfg = pf.ModelConfig.preset("tiny-gpt")
    for needed in (1, 63, 64, 65, 100, cfg.max_seq_len):
        n = compiled.cache_len(cfg, needed)
        assert needed <= n <= cfg.max_seq_len
        for prompt in (1, 5, 16, 17, needed):
            if prompt <= n:
                assert prompt <= compiled.prefill_len(prompt, n) <= n


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="inductor C++ codegen (~1 min); set PANGU_SLOW_TESTS=1")
def test_inductor_decode_matches_eager():
    params, cfg = random_model("tiny-openpangu")
    opts = compiled.CompileOptions(backend="inductor")
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS, 4, opts), 1e-4)
    int8 = pf.quantize(params, pf.QuantRecipe(scheme="int8"))
    assert_close_and_same_argmax(decode_both(int8, cfg, PROMPTS[:2], 3, opts), 2e-2)


def test_aot_package_key_follows_shapes_not_weight_values():
    params, cfg = random_model("tiny-gpt")
    tokens = torch.zeros(1, dtype=torch.int64)
    key = aot.package_key(cfg, params, "decode", [tokens])
    other_weights, _ = random_model("tiny-gpt", seed=1)  # the same layout: weights are inputs
    assert aot.package_key(cfg, other_weights, "decode", [tokens]) == key
    assert aot.package_key(cfg, params, "decode", [torch.zeros(2, dtype=torch.int64)]) != key
    assert aot.package_key(cfg, params, "prefill", [tokens]) != key
    assert aot.package_key(cfg, pf.astype(params, torch.bfloat16), "decode", [tokens]) != key
    w = params["tok_embed"]["weight"]
    flipped = w.contiguous() if not w.is_contiguous() else w.t().contiguous().t()  # row- <-> column-major
    assert aot.package_key(cfg, {**params, "tok_embed": {"weight": flipped}}, "decode", [tokens]) != key
    wider, wider_cfg = random_model("tiny-gpt", intermediate_size=2 * cfg.intermediate_size)
    assert aot.package_key(wider_cfg, wider, "decode", [tokens]) != key
    with pytest.raises(pf.ConfigError, match="tree of tensors"):
        aot.package_key(cfg, pf.quantize(params, pf.QuantRecipe(scheme="int8")), "decode", [tokens])


def test_aot_cache_loads_only_our_private_packages(tmp_path, monkeypatch):
    """A cached package is loaded when it is our regular file, never when it is writable by
    others or a link (then programs compile into a private temporary folder)."""
    params, cfg = random_model("tiny-gpt")
    monkeypatch.setenv("PANGU_FN_CACHE", str(tmp_path / "cache"))
    loaded, compiled_to = [], []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: loaded.append(path) or (lambda *a: a))
    monkeypatch.setattr(aot, "_compile", lambda step, params, args, path: compiled_to.append(path) or path.touch())
    progs = aot.AotPrograms(cfg, torch.device("cpu"))
    cache = progs.init_cache(params, 1, 8)
    args = (torch.zeros(1, dtype=torch.int64), cache.keys, cache.values, cache.lengths)
    _, how = progs._load_or_compile("decode", params, args)  # compiles into the shared cache
    folder = tmp_path / "cache" / "aot"
    assert how == "compiled" and compiled_to[-1].parent == folder and oct(folder.stat().st_mode & 0o777) == "0o700"
    shared = compiled_to[-1]
    assert progs._load_or_compile("decode", params, args)[1] == "loaded" and loaded[-1] == str(shared)
    shared.chmod(0o666)
    assert progs._load_or_compile("decode", params, args)[1] == "compiled"
    assert compiled_to[-1].parent != folder and loaded[-1] == str(compiled_to[-1])
    shared.unlink()
    shared.symlink_to(compiled_to[-1])
    assert progs._load_or_compile("decode", params, args)[1] == "compiled" and compiled_to[-1].parent != folder


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"),
                    reason="AOTInductor compiles each program for ~35-45 s here; set PANGU_SLOW_TESTS=1")
def test_aot_decode_matches_eager_and_loads_in_a_new_process(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PANGU_FN_CACHE": str(tmp_path)}
    script = ("import json, torch, pangu_fn as pf; from pangu_fn import compiled\n"
              "from helpers import random_model\n"
              "params, cfg = random_model('tiny-openpangu')\n"
              f"got = pf.generate(params, cfg, {PROMPTS[:2]!r}, 6, eos_token_ids=(), compile='aot')\n"
              f"want = pf.generate(params, cfg, {PROMPTS[:2]!r}, 6, eos_token_ids=())\n"
              "progs = compiled.programs(params, cfg, compiled.CompileOptions('aot'))\n"
              "print(json.dumps([[c.tokens for c in got], [c.tokens for c in want], progs.events]))\n")
    runs = []
    for _ in range(2):  # the second process loads the packages the first compiled
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=600, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for got, want, _ in runs:
        assert got == want
    assert [how for _, how, _ in runs[0][2]] == ["compiled", "compiled"]
    assert [how for _, how, _ in runs[1][2]] == ["loaded", "loaded"]


def test_bench_compile_list_times_every_backend_in_one_run(tmp_path):
    from pangu_tools.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-gpt", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1",
                 "--warmup", "0", "--compile", "eager,aot_eager", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in rows] == ["pangu-fn", "pangu-fn compiled eager", "pangu-fn compiled aot_eager"]
    # both compiled rows were timed in turns with one eager engine: the same eager figure
    assert rows[1]["in_turns"]["eager_decode_tok_s"] == rows[2]["in_turns"]["eager_decode_tok_s"]
    for row in rows[1:]:
        assert row["in_turns"]["decode_vs_eager"] == round(row["decode_tok_s"] / row["in_turns"]["eager_decode_tok_s"], 3)


def test_npu_backend_is_torchairs_graph_backend(monkeypatch):
    """On Ascend the compiled programs use TorchAir's backend (as its user guide shows: import
    torch_npu, then torchair; a CompilerConfig with the mode; get_npu_backend), here with
    stand-in modules since no NPU stack is installed."""
    import sys
    import types

    made = {}

    class CompilerConfig:
        mode = "max-autotune"

    def get_npu_backend(*, compiler_config):
        made["mode"] = compiler_config.mode
        return "npu-backend"

    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setitem(sys.modules, "torchair", types.SimpleNamespace(CompilerConfig=CompilerConfig,
                                                                      get_npu_backend=get_npu_backend))
    assert compiled.npu_backend(None) == "npu-backend" and made["mode"] == "reduce-overhead"
    assert compiled.npu_backend("max-autotune") == "npu-backend" and made["mode"] == "max-autotune"
