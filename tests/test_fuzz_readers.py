"""Every reader of untrusted files raises only its typed error: random mutations of a valid
safetensors header, of our config.json (with quantized-leaf descriptions), of Hugging Face
config.json dicts and of a bundle manifest never raise anything but a PanguError (the
runtime's PanguRuntimeError for the manifest), and run with the address space capped at
256 MiB above its size before the call, so that no reader allocates what a header claims."""

from __future__ import annotations

import contextlib
import json
import resource
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pangu_runtime.errors import PanguRuntimeError
from pangu_runtime.manifest import load_manifest, sha256_file

import pangu_fn as pf
from pangu_fn.errors import ConfigError, FormatError, PanguError
from pangu_fn.io import hf
from pangu_fn.io.checkpoint import load_config, open_source
from pangu_fn.io.safetensors_io import SafetensorsFile, read_slice

MIB = 2**20
HOSTILE_INTS = [0, 1, -1, 3, 2**31, 2**62, 2**63, 2**64 - 1, 2**70, 10**400]
json_scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(HOSTILE_INTS), st.integers(-5, 300),
                         st.floats(allow_nan=True), st.text(max_size=6), st.sampled_from([".", "..", "/etc/passwd"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)


def paths_of(d, prefix=()) -> list[tuple]:
    """Every key path of a nested dict/list."""
    out = [prefix] if prefix else []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        out += paths_of(v, (*prefix, k))
    return out


@st.composite
def mutated(draw, base: dict, extra_keys: tuple[str, ...] = ()) -> dict:
    """`base` (JSON) with 1-3 mutations: a value replaced by a random JSON value, a key
    deleted, or a key (random or from `extra_keys`) added."""
    d = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(d)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        *parent_path, key = path
        parent = d
        for k in parent_path:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(extra_keys) if extra_keys else st.text(max_size=5))] = draw(json_values)
    return d


@contextlib.contextmanager
def memory_cap(extra: int = 256 * MIB):
    """RLIMIT_AS set to the current address-space size plus `extra` bytes, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the memory cap")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


# -- safetensors ------------------------------------------------------------------------------

def st_bytes(header: dict, buffer: bytes, length_delta: int = 0) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) + length_delta) + raw + buffer


GOOD_HEADER = {"__metadata__": {"format": "pt"},
               "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
               "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}


def read_everything(f: Path) -> None:
    """Open `f`, read every tensor whole and sliced; every result fits in the file."""
    st_file = SafetensorsFile(f)
    for name, info in st_file.infos.items():
        t = st_file.get(name)
        assert t.shape == info.shape and t.numel() * t.element_size() <= f.stat().st_size
        if info.shape:
            part = read_slice(f, name, 0, 0, min(1, info.shape[0]))
            assert part.numel() * part.element_size() <= f.stat().st_size


@needs_proc
def test_the_memory_cap_stops_a_large_allocation():
    with memory_cap(), pytest.raises(RuntimeError):
        torch.empty(2**30, dtype=torch.uint8).fill_(1)  # 1 GiB, beyond the cap's 256 MiB
    assert torch.empty(2**30, dtype=torch.uint8).numel() == 2**30  # and the cap is lifted after


def test_a_valid_file_reads_as_the_library_wrote_it(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.arange(5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors")
    st_file = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(st_file.get("w"), tensors["w"]) and torch.equal(st_file.get("b"), tensors["b"])
    assert torch.equal(read_slice(tmp_path / "x.safetensors", "w", 1, 1, 3), tensors["w"][:, 1:3])
    assert torch.equal(read_slice(tmp_path / "x.safetensors", "w", -2, 2, 3), tensors["w"][2:3])
    with pytest.raises(pf.InputError, match=r"shape \[3, 4\].*0 <= start <= stop <= 4 along dim 1, found 2:5"):
        read_slice(tmp_path / "x.safetensors", "w", 1, 2, 5)
    with pytest.raises(FormatError, match="no tensor 'v'"):
        read_slice(tmp_path / "x.safetensors", "v", 0, 0, 1)


@pytest.mark.parametrize("entry,buffer,match", [
    ({"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}, b"", "overflows 64-bit byte strides"),
    ({"dtype": "F32", "shape": [2**70], "data_offsets": [0, 8]}, b"\0" * 8, "overflows 64-bit byte strides"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8000]}, b"\0" * 8, "run past the end of the 8-byte buffer"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, b"\0" * 8, "expected a list of non-negative integers"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, b"\0" * 8, "expected a list of non-negative integers"),
    ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, b"\0" * 8, "expected a list of non-negative integers"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, b"\0" * 8, "non-negative integers"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, b"\0" * 8, "dtype \\['F32'\\]; expected one of"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}, b"\0" * 8, "data_offsets .* expected \\[begin, end\\]"),
])
def test_hostile_safetensors_entries_name_file_tensor_and_field(tmp_path, entry, buffer, match):
    f = tmp_path / "x.safetensors"
    f.write_bytes(st_bytes({"a": entry}, buffer))
    with pytest.raises(FormatError, match=f"{f}: tensor 'a': .*{match}"):
        SafetensorsFile(f)


def test_header_lengths_are_checked_before_reading(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(st_bytes(GOOD_HEADER, bytes(22), length_delta=10**6))
    with pytest.raises(FormatError, match="runs past the end of the file"):
        SafetensorsFile(f)
    f.write_bytes(struct.pack("<Q", 100_000_001) + b" " * 100)
    with pytest.raises(FormatError, match="exceeds the limit of 100000000 bytes"):
        SafetensorsFile(f)
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(FormatError, match="names 'a' twice"):
        SafetensorsFile(f)
    f.write_bytes(struct.pack("<Q", 5000) + b"1" * 5000)  # more digits than Python converts
    with pytest.raises(FormatError, match="not valid JSON"):
        SafetensorsFile(f)


@needs_proc
@FUZZ
@given(header=mutated(GOOD_HEADER, extra_keys=("dtype", "shape", "data_offsets", "c")),
       tail=st.sampled_from([0, 0, 0, -1, 1, 8, 2**20]), length_delta=st.sampled_from([0, 0, 0, -3, 1]))
def test_fuzzed_safetensors_headers_raise_only_format_errors(header, tail, length_delta):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "f.safetensors"
        buffer = bytes(range(22))
        buffer = buffer[:tail] if tail < 0 else buffer + b"\0" * tail
        f.write_bytes(st_bytes(header, buffer, length_delta))
        with memory_cap():
            try:
                read_everything(f)
            except PanguError:
                pass


@FUZZ
@given(index=mutated({"metadata": {"total_size": 22}, "weight_map": {"w": "model-1.safetensors",
                                                                     "b": "model-1.safetensors"}},
                     extra_keys=("weight_map", "../x.safetensors", "w")))
def test_fuzzed_shard_indexes_raise_only_format_errors(index):
    from pangu_fn.io.source import WeightFiles

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model-1.safetensors").write_bytes(st_bytes(GOOD_HEADER, bytes(range(22))))
        (Path(d) / "model.safetensors.index.json").write_text(json.dumps(index))
        try:
            files = WeightFiles(d)
            for name in files.keys():  # noqa: SIM118  (keys() only, not a mapping)
                files.get(name)
        except FormatError:
            pass


# -- our config.json ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory) -> Path:
    cfg = pf.ModelConfig.preset("tiny-gpt")
    params = pf.quantize(pf.init_params(cfg), pf.quant.QuantRecipe(scheme="int8", compute_dtype="fp32", prepack=False))
    return pf.save(tmp_path_factory.mktemp("fuzz") / "q", params, cfg)


def load_with_config(folder: Path, config: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").symlink_to(folder / "model.safetensors")
        (Path(d) / "config.json").write_text(json.dumps(config))
        with memory_cap(512 * MIB):
            try:
                load_config(d)
                pf.load(d)
            except PanguError:
                pass


def test_our_config_with_wrong_types_names_the_key(quantized_folder):
    d = json.loads((quantized_folder / "config.json").read_text())
    assert d["leaves"], "the fuzzed folder holds quantized leaves"
    for key, value, match in (("hidden_size", "64", "hidden_size expected int, found '64'"),
                              ("num_heads", 0, "num_heads a positive int"),
                              ("norm_eps", None, "norm_eps expected float, found None")):
        bad = {**d, "config": {**d["config"], key: value}}
        (quantized_folder.parent / "bad").mkdir(exist_ok=True)
        (quantized_folder.parent / "bad" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=f"config.json: .*{match}"):
            load_config(quantized_folder.parent / "bad")
    leaf = next(iter(d["leaves"]))
    for desc in (5, {"kind": 3}, [1]):
        with pytest.raises(FormatError, match=f"leaf '{leaf}': expected an object with a string 'kind'"):
            open_source(_with_config(quantized_folder, {**d, "leaves": {**d["leaves"], leaf: desc}}))


def _with_config(folder: Path, config: dict) -> Path:
    out = folder.parent / "variant"
    out.mkdir(exist_ok=True)
    if not (out / "model.safetensors").exists():
        (out / "model.safetensors").symlink_to(folder / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


@needs_proc
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_our_config_raises_only_pangu_errors(quantized_folder, data):
    base = json.loads((quantized_folder / "config.json").read_text())
    load_with_config(quantized_folder, data.draw(mutated(base, extra_keys=("leaves", "kind", "group_size"))))


# -- Hugging Face config.json ------------------------------------------------------------------

GPT2 = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "eos_token_id": 2,
        "bos_token_id": 1, "tie_word_embeddings": True}
LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "rope_scaling": None, "attention_bias": True, "tie_word_embeddings": False, "eos_token_id": [2, 3]}


@pytest.mark.parametrize("d,match", [
    ({"model_type": "gpt2"}, "missing key 'n_embd'"),
    ({**GPT2, "n_head": 0}, r"'n_head' expected an integer in \[1, 2147483647\], found 0"),
    ({**GPT2, "n_embd": "64"}, "'n_embd' expected an integer .* found '64'"),
    ({**GPT2, "n_head": 5}, "n_embd 64 is not divisible by n_head 5"),
    ({**LLAMA, "rms_norm_eps": "1e-6"}, "'rms_norm_eps' expected a finite number, found '1e-6'"),
    ({**LLAMA, "rope_scaling": [2.0]}, "rope_scaling expected an object"),
    ({**LLAMA, "num_key_value_heads": 3}, "num_heads divisible by num_kv_heads"),
])
def test_hf_configs_with_missing_or_wrong_keys_name_them(d, match):
    with pytest.raises(ConfigError, match=match):
        hf.config_from_hf(d)


def test_valid_hf_configs_read_as_before():
    gpt = hf.config_from_hf(GPT2)
    assert (gpt.hidden_size, gpt.num_heads, gpt.head_dim, gpt.intermediate_size) == (64, 4, 16, 256)
    llama = hf.config_from_hf(LLAMA)
    assert (llama.num_kv_heads, llama.eos_token_id, llama.attn_bias, llama.rope_theta) == (2, 2, True, 10000.0)


@FUZZ
@given(d=st.one_of(mutated(GPT2, extra_keys=tuple(GPT2)), mutated(LLAMA, extra_keys=tuple(LLAMA))))
def test_fuzzed_hf_configs_raise_only_config_errors(d):
    try:
        cfg = hf.config_from_hf(d)
    except ConfigError:
        return
    assert isinstance(cfg, pf.ModelConfig) and cfg.num_heads * cfg.head_dim > 0


# -- bundle manifests --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, dict]:
    """A bundle folder whose manifest has every field an ort export writes (files are stand-ins:
    load_manifest checks paths and hashes, not the ONNX graph)."""
    folder = tmp_path_factory.mktemp("bundle")
    for name, data in (("model.onnx", b"graph"), ("model.onnx.data", b"weights"), ("tokenizer.json", b"{}")):
        (folder / name).write_bytes(data)
    m = {"format": "pangu-bundle", "version": 1, "target": "ort",
         "config": pf.ModelConfig.preset("tiny-gpt").to_dict(),
         "model": {"file": "model.onnx", "external_data": ["model.onnx.data"], "format": "onnx", "opset": 18,
                   "dtype": "float32", "accuracy_level": 0},
         "inputs": ["input_ids", "position_ids", "attention_mask"], "outputs": ["logits"],
         "cache": {"blocks": 2, "kv_heads": [4, 4], "head_dim": 16, "dtype": "float32", "layout": "growing",
                   "axes": ["batch", "kv_heads", "position", "head_dim"], "share_buffer": False},
         "tokenizer": {"file": "tokenizer.json", "kind": "tokenizers", "extra_files": [], "vocab_size": 256,
                       "bos_id": 1, "eos_id": 2, "pad_id": 0},
         "generation": {"eos_token_ids": [2], "max_new_tokens": 16},
         "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}}
    (folder / "manifest.json").write_text(json.dumps(m))
    assert load_manifest(folder) == m
    return folder, m


def write_manifest(folder: Path, m: dict) -> Path:
    out = Path(tempfile.mkdtemp(dir=folder.parent))
    for p in folder.iterdir():
        if p.name != "manifest.json":
            (out / p.name).write_bytes(p.read_bytes())
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("change,match", [
    (lambda m: m["files"].update({".": {"sha256": "0" * 64}}), "expected a file name, found '.'"),
    (lambda m: m.update(tokenizer=5), "tokenizer: expected an object or null, found 5"),
    (lambda m: m["model"].update(external_data=5), "model.external_data: expected a list of file names"),
    (lambda m: m.update(cache={}), "cache.layout: expected one of"),
    (lambda m: m["cache"].update(kv_heads=[4]), "cache.kv_heads: expected one positive head count per block"),
    (lambda m: m.update(version=2), "format version 2 was written by a newer pangu-fn"),
    (lambda m: m.update(version=True), "expected an integer format version >= 1, found True"),
    (lambda m: m.update(version="1"), "expected an integer format version >= 1, found '1'"),
])
def test_hostile_manifests_name_the_field(bundle, change, match):
    folder, m = bundle
    bad = json.loads(json.dumps(m))
    change(bad)
    with pytest.raises(PanguRuntimeError, match=match):
        load_manifest(write_manifest(folder, bad))


@needs_proc
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzzed_manifests_raise_only_bundle_errors(bundle, data):
    folder, m = bundle
    out = write_manifest(folder, data.draw(mutated(m, extra_keys=("tokenizer", "cache", "ascend", "generation"))))
    with memory_cap():
        try:
            load_manifest(out)
        except PanguRuntimeError:
            pass


# -- the command line --------------------------------------------------------------------------

def test_bad_files_print_one_line_and_exit_2(tmp_path, bundle, capsys):
    from pangu_tools.cli import main

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "config.json").write_text(json.dumps({**GPT2, "n_head": 0}))
    (hostile / "model.safetensors").write_bytes(
        st_bytes({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b""))
    assert main(["convert", str(hostile), str(tmp_path / "out")]) == 2
    assert "'n_head' expected an integer" in capsys.readouterr().err
    (hostile / "config.json").write_text(json.dumps(GPT2))
    assert main(["convert", str(hostile), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overflows 64-bit byte strides" in err
    folder, m = bundle
    assert main(["run", str(write_manifest(folder, {**m, "cache": {}})), "--prompt-ids", "1 2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache.layout: expected one of" in err
    assert not (tmp_path / "out").exists()


def test_the_cli_does_not_hide_bugs(tmp_path, monkeypatch):
    from pangu_tools.cli import main

    def bug(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr("pangu_fn.io.checkpoint.open_source", bug)
    with pytest.raises(KeyError, match="a bug"):  # propagates: python -m prints its traceback
        main(["convert", str(tmp_path), str(tmp_path / "out")])
