"""Export parity: ONNX bundles run by pangu_runtime (ONNX Runtime) and the torch.export
program reproduce `pangu_fn.forward` / `generate` for every family, ragged batches included.

Exports take seconds, so each bundle is built once per test run and shared by the xdist
workers (`shared_bundle`)."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import FAMILIES, random_model
from pangu_export import export_bundle, load_program
from pangu_runtime import BundleFormatError, PromptLookup, Session
from pangu_runtime.manifest import sha256_file

import pangu_fn as pf

PROMPTS = [[5, 17, 42, 9, 5, 17, 42, 9, 5], [3, 88], [100, 7, 7, 61, 200, 33]]  # ragged


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, request) -> Path:
    """A folder all xdist workers of this run see (the parent of their own temp roots)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if hasattr(request.config, "workerinput") else base
    folder = root / "pangu-export-bundles"
    folder.mkdir(exist_ok=True)
    return folder


def shared_bundle(shared_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build `name` once (the first worker to ask builds it, under a file lock)."""
    path = shared_dir / name
    with open(shared_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "manifest.json").is_file():
            build(path)
    return path


def ort_bundle(shared_dir: Path, family: str) -> Path:
    params, cfg = random_model(family)
    return shared_bundle(shared_dir, f"ort-{family}",
                         lambda p: export_bundle(params, cfg, p, "ort", progress=False))


def step_logits(params, cfg, session: Session, prompts, steps: int) -> tuple[list, list]:
    """Teacher-forced logits of a ragged batch from forward and from the session: the padded
    prefill, then `steps` single-token calls at each row's own position."""
    B, T = len(prompts), max(map(len, prompts))
    lengths = [len(p) for p in prompts]
    tokens = torch.zeros(B, T, dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    cache = pf.init_cache(params, cfg, B, T + steps)
    ort_cache = session.new_cache(B, T + steps)
    ref, got = [], []
    with torch.no_grad():
        logits, cache = pf.forward(params, cfg, tokens, cache)
        ort_logits = session.forward(tokens.numpy(), ort_cache)
        cache = cache.with_lengths(lengths)
        ort_cache.lengths[:] = lengths
        rows = torch.arange(B)
        ref.append(logits[rows, torch.tensor(lengths) - 1].numpy())
        got.append(ort_logits[np.arange(B), np.array(lengths) - 1])
        for _ in range(steps):
            nxt = torch.from_numpy(ref[-1]).argmax(-1)[:, None]
            logits, cache = pf.forward(params, cfg, nxt, cache)
            ref.append(logits[:, -1].numpy())
            got.append(session.forward(nxt.numpy(), ort_cache)[:, -1])
    return ref, got


@pytest.mark.heavy
@pytest.mark.parametrize("family", FAMILIES)
def test_ort_bundle_reproduces_forward(shared_dir, family):
    params, cfg = random_model(family)
    s = Session(ort_bundle(shared_dir, family))
    with torch.no_grad():  # whole prompts, no cache
        for prompt, got in zip(PROMPTS, s.logits(PROMPTS)):
            ref, _ = pf.forward(params, cfg, torch.tensor([prompt]))
            assert np.abs(got - ref[0].numpy()).max() <= 1e-4
    ref, got = step_logits(params, cfg, s, PROMPTS, 12)
    errors = [float(np.abs(r - g).max()) for r, g in zip(ref, got)]
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_greedy_64_tokens_ragged(shared_dir, family):
    params, cfg = random_model(family)
    s = Session(ort_bundle(shared_dir, family))
    want = pf.generate(params, cfg, PROMPTS, 64, eos_token_ids=())
    got = s.generate(PROMPTS, 64, eos_token_ids=())
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert len({t for c in want for t in c.tokens}) > 3  # the outputs are not a constant stream
    lookup = s.generate(PROMPTS, 64, eos_token_ids=(), lookup=PromptLookup(num_draft=4))
    assert [c.tokens for c in lookup] == [c.tokens for c in want]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_group_query_attention_and_runs_without_shared_buffers(shared_dir, family):
    """The graph's attention is one GroupQueryAttention per cached block (the runtime binds past
    and present to one buffer); a plain optimum-style loop that feeds `present` back as `past`
    (no shared buffer, ragged rows at their own positions) still reproduces forward."""
    import onnxruntime as ort

    params, cfg = random_model(family)
    path = ort_bundle(shared_dir, family)
    m = json.loads((path / "manifest.json").read_text())
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert m["cache"]["share_buffer"] and ops.count("GroupQueryAttention") == len(m["cache"]["kv_heads"])
    assert "MultiHeadAttention" not in ops and "If" not in ops and "ScatterElements" not in ops
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    B, T, heads = len(PROMPTS), max(map(len, PROMPTS)), m["cache"]["kv_heads"]
    lengths = np.array([len(p) for p in PROMPTS])
    tokens = np.zeros((B, T), np.int64)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    past = [np.zeros((B, h, 0, cfg.head_dim), np.float32) for h in heads for _ in (0, 1)]
    positions = np.arange(T)[None].repeat(B, 0)
    ref_cache = pf.init_cache(params, cfg, B, T + 8)
    with torch.no_grad():
        ref, ref_cache = pf.forward(params, cfg, torch.from_numpy(tokens), ref_cache)
        ref_cache = ref_cache.with_lengths(lengths.tolist())
        ref = ref[torch.arange(B), torch.from_numpy(lengths) - 1].numpy()
        for step in range(8):
            feeds = {"input_ids": tokens, "position_ids": positions,
                     "attention_mask": np.ones((B, past[0].shape[2] + tokens.shape[1]), np.int64)}
            feeds.update(zip(m["inputs"][3:], past))
            logits, *past = session.run(None, feeds)
            got = logits[np.arange(B), lengths - 1] if step == 0 else logits[:, -1]
            assert np.abs(got - ref).max() <= 1e-4
            tokens = ref.argmax(-1)[:, None]
            positions = lengths[:, None].copy()
            lengths = lengths + 1
            ref, ref_cache = pf.forward(params, cfg, torch.from_numpy(tokens), ref_cache)
            ref = ref[:, -1].numpy()


def test_bundle_without_fusions_runs_on_growing_buffers(tmp_path):
    """`--no-fusions` keeps the plain attention and the cache write: no shared buffer, the
    runtime alternates two growing buffers (and compacts them after lookup rejections)."""
    params, cfg = random_model("tiny-gpt")
    m = export_bundle(params, cfg, tmp_path / "plain", "ort", progress=False, ort_fusions=False, genai=False)
    assert m["cache"]["share_buffer"] is False
    s = Session(tmp_path / "plain")
    want = pf.generate(params, cfg, PROMPTS, 24, eos_token_ids=())
    assert [c.tokens for c in s.generate(PROMPTS, 24, eos_token_ids=())] == [c.tokens for c in want]
    lookup = s.generate(PROMPTS, 24, eos_token_ids=(), lookup=PromptLookup(num_draft=4))
    assert [c.tokens for c in lookup] == [c.tokens for c in want]


def test_eos_and_finish_reasons_match_generate(shared_dir):
    params, cfg = random_model("tiny-gpt")
    s = Session(ort_bundle(shared_dir, "tiny-gpt"))
    free = pf.generate(params, cfg, PROMPTS, 20, eos_token_ids=())
    eos = [free[0].tokens[5], free[2].tokens[11]]  # rows 0 and 2 stop early
    want = pf.generate(params, cfg, PROMPTS, 20, eos_token_ids=eos)
    got = s.generate(PROMPTS, 20, eos_token_ids=eos)
    assert [(c.tokens, c.finish_reason) for c in got] == [(c.tokens, c.finish_reason) for c in want]
    assert {c.finish_reason for c in got} == {"eos", "length"} or all(c.finish_reason == "eos" for c in got)


def test_manifest_describes_the_bundle(shared_dir):
    path = ort_bundle(shared_dir, "tiny-openpangu")
    m = json.loads((path / "manifest.json").read_text())
    cfg = pf.ModelConfig.preset("tiny-openpangu")
    assert m["format"] == "pangu-bundle" and m["version"] == 1 and m["target"] == "ort"
    assert pf.ModelConfig.from_dict(m["config"]) == cfg
    assert m["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert m["inputs"][3:] == [f"past_key_values.{i}.{kv}" for i in range(cfg.num_blocks) for kv in ("key", "value")]
    assert m["outputs"] == ["logits"] + [f"present.{i}.{kv}" for i in range(cfg.num_blocks) for kv in ("key", "value")]
    assert m["cache"]["kv_heads"] == [cfg.num_kv_heads] * cfg.num_blocks and m["cache"]["dtype"] == "float32"
    assert m["model"]["opset"] == 18 and m["quantization"] is None
    for name, entry in m["files"].items():
        assert sha256_file(path / name) == entry["sha256"]
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    names = {i.name for i in graph.graph.initializer}
    assert "tok_embed.weight" in names  # parameters keep their tree names


@pytest.mark.heavy
def test_fp16_and_bf16_exports(tmp_path):
    params, cfg = random_model("tiny-openpangu", num_layers=1)  # one block: these exports only test dtypes
    export_bundle(params, cfg, tmp_path / "fp16", "ort", dtype="fp16", progress=False, genai=False)
    s = Session(tmp_path / "fp16")
    half = pf.astype(params, "fp16")
    with torch.no_grad():
        for prompt, got in zip(PROMPTS, s.logits(PROMPTS)):
            ref, _ = pf.forward(half, cfg, torch.tensor([prompt]))
            ref = ref[0].float().numpy()
            assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()  # fp16 rounding, not a bug
    ref, got = step_logits(half, cfg, s, PROMPTS, 6)  # decode steps through the shared fp16 cache
    for r, g in zip(ref, got):
        assert np.abs(g - r.astype(np.float32)).max() <= 0.05 * np.abs(r.astype(np.float32)).max()
    m = export_bundle(params, cfg, tmp_path / "bf16", "ort", dtype="bf16", progress=False, ort_fusions=False)
    graph = onnx.load(str(tmp_path / "bf16" / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)  # valid at opset 18 (the fusions add ORT-only ops)
    assert graph.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert any("bfloat16" in note for note in m["genai"]["notes"])
    with pytest.raises(BundleFormatError, match="bfloat16"):  # numpy holds no bf16 caches
        Session(tmp_path / "bf16")


def test_pt2_program_reproduces_forward(shared_dir):
    params, cfg = random_model("tiny-alpha")
    path = shared_bundle(shared_dir, "torch-tiny-alpha",
                         lambda p: export_bundle(params, cfg, p, "torch", progress=False))
    program = load_program(path)
    B, T = len(PROMPTS), max(map(len, PROMPTS))
    tokens = torch.zeros(B, T, dtype=torch.int64)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = torch.tensor(p)
    ours, ref = program.new_cache(B, T + 8), pf.init_cache(params, cfg, B, T + 8)
    with torch.no_grad():
        a, ours = program(tokens, ours)
        b, ref = pf.forward(params, cfg, tokens, ref)
        assert (a - b).abs().max() <= 1e-4
        lengths = [len(p) for p in PROMPTS]
        ours, ref = ours.with_lengths(lengths), ref.with_lengths(lengths)
        for _ in range(4):
            nxt = b[:, -1].argmax(-1)[:, None]
            a, ours = program(nxt, ours)
            b, ref = pf.forward(params, cfg, nxt, ref)
            assert (a - b).abs().max() <= 1e-4
    assert torch.equal(ours.lengths, ref.lengths)
    for k1, k2 in zip(ours.keys, ref.keys):
        assert (k1 - k2).abs().max() <= 1e-4


def test_pt2_with_pickled_entries_is_refused(shared_dir, tmp_path):
    import shutil
    import zipfile

    params, cfg = random_model("tiny-alpha")
    path = shared_bundle(shared_dir, "torch-tiny-alpha",
                         lambda p: export_bundle(params, cfg, p, "torch", progress=False))
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    src, dst = path / "model.pt2", bad / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            zout.writestr(item, data)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["model.pt2"]["sha256"] = sha256_file(dst)
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(pf.FormatError, match="pickled"):
        load_program(bad)


def test_cli_export_and_run(shared_dir, tmp_path, capsys):
    from pangu_tools.cli import main

    out = tmp_path / "cli-bundle"
    assert main(["export", "tiny-gpt", str(out), "--target", "torch"]) == 0
    assert json.loads((out / "manifest.json").read_text())["target"] == "torch" and (out / "model.pt2").is_file()
    capsys.readouterr()
    bundle = ort_bundle(shared_dir, "tiny-gpt")
    assert main(["run", str(bundle), "--prompt-ids", "1 2 3;4 5", "--max-new-tokens", "6", "--no-eos"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    params, cfg = random_model("tiny-gpt")
    want = pf.generate(params, cfg, [[1, 2, 3], [4, 5]], 6, eos_token_ids=())
    assert lines == [" ".join(map(str, c.tokens)) for c in want]
    assert main(["export", "tiny-gpt", str(tmp_path / "x"), "--target", "ascend", "--prefill-lengths", "4,8"]) == 2
    assert not (tmp_path / "x").exists()  # a refused export leaves nothing behind
    assert main(["run", str(tmp_path / "nothing"), "--prompt-ids", "1"]) == 2


DEMO = Path(__file__).resolve().parents[1] / "models" / "demo" / "target"


def demo_bundle(shared_dir: Path) -> tuple[Path, dict, pf.ModelConfig]:
    """The demo model exported once per run (fp32: it is stored in bf16, which ONNX Runtime's
    CPU provider cannot run), with its tokenizer."""
    params, cfg = pf.load(DEMO, dtype="fp32")
    path = shared_bundle(shared_dir, "ort-demo",
                         lambda p: export_bundle(params, cfg, p, "ort", tokenizer=DEMO, progress=False))
    return path, params, cfg


@pytest.mark.heavy
def test_demo_text_in_text_out(shared_dir):
    """The trained demo model (openPangu family, SentencePiece tokenizer) through the runtime:
    text in, the same greedy text out as pangu_fn, with the tokenizer carried by the bundle."""
    path, params, cfg = demo_bundle(shared_dir)
    assert json.loads((path / "manifest.json").read_text())["tokenizer"]["kind"] == "sentencepiece"
    from pangu_fn.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    texts = ["The Python tutorial explains how to", "A list comprehension"]
    ids = [tok.encode(t, add_bos=True) for t in texts]
    want = [tok.decode(c.tokens) for c in pf.generate(params, cfg, ids, 24)]
    s = Session(path)
    assert s.tokenizer.encode(texts[0], add_bos=True) == ids[0]
    assert s.generate_text(texts, 24) == want
    assert all(w.strip() for w in want)


def test_external_data_past_the_limit(tmp_path, monkeypatch):
    """Weights go to model.onnx.data past 2 GB; the limit is lowered here to see it happen."""
    from pangu_export import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 2**26 + 1024)
    params, cfg = random_model("tiny-gpt")
    m = export_bundle(params, cfg, tmp_path / "ext", "ort", progress=False, genai=False)
    assert m["model"]["external_data"] == ["model.onnx.data"] and "model.onnx.data" in m["files"]
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000
    want = pf.generate(params, cfg, PROMPTS, 8, eos_token_ids=())
    assert [c.tokens for c in Session(tmp_path / "ext").generate(PROMPTS, 8, eos_token_ids=())] == \
        [c.tokens for c in want]
