"""export_gguf: params tree -> one `.gguf` file that llama.cpp, `llama-server`, Ollama, LM Studio
and llama-cpp-python run.

Written with the `gguf` package (the format's reference implementation, maintained with
llama.cpp): its writer, its metadata keys, its tensor-name tables and its quantizers. The
metadata is what llama.cpp's own converter writes for the architecture; see
`pangu_fn.io.gguf` for the architectures and the name table, and docs/export.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pangu_fn.config import ModelConfig
from pangu_fn.errors import ConfigError, FormatError
from pangu_fn.io.atomic import atomic_file
from pangu_fn.io.destination import check_destination
from pangu_fn.io.gguf import arch_for, require_gguf, rope_permute, tensor_table
from pangu_fn.params import Params, layer_sizes, validate
from pangu_fn.tree import flatten

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


@dataclass
class GGUFSummary:
    """What `export_gguf` wrote: architecture, file type, tensor count and types, bytes, and
    notes (dequantized leaves, tensors kept in another type, a missing tokenizer)."""

    path: Path
    arch: str
    type: str
    tensors: int
    nbytes: int
    types: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_exportable(params: Params, cfg: ModelConfig) -> str:
    """The llama.cpp architecture for this tree, or ConfigError saying why it has none:
    PanGu-α, layers of different widths (llama.cpp reads one head count and FFN width for all
    layers of these architectures), fused projections, GELU variants llama.cpp's `gpt2` does not
    compute, MLP biases on openPangu, or heads that do not tile the hidden size (gpt2)."""
    arch = arch_for(cfg)
    validate(params, cfg)
    for i, blk in enumerate(params["blocks"]):
        if "qkv" in blk["attn"] or "gate_up" in blk["mlp"]:
            raise ConfigError(f"GGUF: block {i} has fused projections; export the unfused tree")
        sizes = layer_sizes(blk, cfg)
        if (sizes.num_heads, sizes.num_kv_heads, sizes.intermediate_size) != \
                (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size):
            raise ConfigError(f"GGUF: block {i} has {sizes.num_heads} heads, {sizes.num_kv_heads} KV heads and FFN "
                              f"width {sizes.intermediate_size}, the config {cfg.num_heads} / {cfg.num_kv_heads} / "
                              f"{cfg.intermediate_size}; llama.cpp's {arch} loads one width for every layer, so "
                              "structured-pruned trees with per-layer widths cannot be exported to GGUF")
    if arch == "gpt2":
        if cfg.activation != "gelu_tanh":
            raise ConfigError(f"GGUF: llama.cpp's gpt2 computes the tanh GELU; this model uses {cfg.activation!r}")
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads:
            raise ConfigError(f"GGUF: llama.cpp's gpt2 needs multi-head attention with heads x head size = hidden "
                              f"size; found {cfg.num_heads} x {cfg.head_dim} (KV heads {cfg.num_kv_heads}), "
                              f"hidden {cfg.hidden_size}")
    elif cfg.mlp_bias:
        raise ConfigError(f"GGUF: llama.cpp's {arch} has no MLP biases; this model has them")
    return arch


def export_gguf(params: Params, cfg: ModelConfig, out: str | Path, type: str = "f16", *,
                tokenizer: str | Path | None = None, chat_template: str | None = None, name: str | None = None,
                progress: bool = True, overwrite: bool = False,
                sources: list[str | Path] | tuple[str | Path, ...] = ()) -> GGUFSummary:
    """Write `params` (unfused; float or quantized leaves) to the GGUF file `out` and return
    what was written. `type` (f32 | f16 | bf16 | q8_0 | q4_0) is the type of every matrix;
    norms, biases and learned positions stay f32 and a matrix whose rows do not split into
    32-wide blocks falls back to f16, as llama.cpp's converter does. Quantized leaves are
    dequantized to `type` (a symmetric group-32 int4 leaf is written directly as q4_0).
    `tokenizer` (a model folder or tokenizer file: SentencePiece `.model` or `tokenizer.json`)
    and `chat_template` (default: its `tokenizer_config.json`'s) go into the file; without a
    tokenizer a note says llama.cpp then needs token ids. The file is written atomically;
    `overwrite` and `sources` as in `export_bundle`. Raises ConfigError for models llama.cpp
    cannot run (see `check_exportable`) or a bad `type`, FormatError for a bad tokenizer."""
    gguf = require_gguf()
    if type not in GGUF_TYPES:
        raise ConfigError(f"GGUF: unknown type {type!r}; expected one of {GGUF_TYPES}")
    arch = check_exportable(params, cfg)
    check_destination(out, overwrite=overwrite, sources=sources)
    out = Path(out)
    summary = GGUFSummary(out, arch, type, 0, 0)
    vocab = _tokenizer_metadata(tokenizer, chat_template, cfg, summary.notes)
    flat = flatten(params)
    plan = _tensor_plan(flat, cfg, arch, type, summary.notes)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[_model_arch(arch)])
        _add_metadata(writer, cfg, arch, type, name)
        for key, value in vocab:
            getattr(writer, key)(*value)
        for gname, shape, qtype, _ in plan:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            nbytes = int(np.prod(byte_shape)) if qtype not in (_t("F32"), _t("F16")) else \
                int(np.prod(shape)) * (4 if qtype == _t("F32") else 2)
            if qtype in (_t("F32"), _t("F16")):
                writer.add_tensor_info(gname, shape, np.dtype(np.float32 if qtype == _t("F32") else np.float16),
                                       nbytes)
            else:
                writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=len(plan), desc=f"export gguf {type}", unit="tensor", file=sys.stderr,
                  disable=not progress) as bar:
            for gname, _, qtype, make in plan:
                data = make()
                writer.write_tensor_data(data)
                summary.nbytes += data.nbytes
                summary.types[qtype.name] = summary.types.get(qtype.name, 0) + 1
                bar.update(1)
        writer.close()
    summary.tensors = len(plan)
    return summary


def _t(name: str) -> Any:
    return getattr(require_gguf().GGMLQuantizationType, name)


def _model_arch(arch: str) -> Any:
    gguf = require_gguf()
    return {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA,
            "pangu-embedded": gguf.MODEL_ARCH.PANGU_EMBED}[arch]


def _add_metadata(writer: Any, cfg: ModelConfig, arch: str, type: str, name: str | None) -> None:
    """The keys llama.cpp's converter writes for `arch` (and llama.cpp reads)."""
    gguf = require_gguf()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or f"pangu-fn {cfg.family} {cfg.num_layers}x{cfg.hidden_size}")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0"}[type]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- tensors ---------------------------------------------------------------------------------

Plan = list[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]]


def _tensor_plan(flat: dict[str, Any], cfg: ModelConfig, arch: str, type: str, notes: list[str]) -> Plan:
    """(GGUF name, numpy shape, GGML type, a function making the bytes) for every tensor."""
    gguf = require_gguf()
    chosen = _t(type.upper())
    fallback: list[str] = []
    dequantized: list[str] = []
    direct: list[str] = []
    plan: Plan = []
    for gname, ours in tensor_table(cfg, arch).items():
        leaves = [flat[n] for n in ours]
        quantized = [not isinstance(leaf, torch.Tensor) for leaf in leaves]
        shape = (sum(_leaf_shape(leaf)[0] for leaf in leaves), *_leaf_shape(leaves[0])[1:])
        if len(shape) == 1 or gname.startswith(("position_embd",)) or "_norm." in gname:
            qtype = _t("F32")
        elif type in ("q8_0", "q4_0") and shape[-1] % gguf.GGML_QUANT_SIZES[chosen][0]:
            qtype = _t("F16")
            fallback.append(gname)
        else:
            qtype = chosen
        if any(quantized):
            if type == "q4_0" and len(leaves) == 1 and _is_q4_0(leaves[0]):
                direct.append(gname)
                plan.append((gname, shape, qtype, lambda leaf=leaves[0]: _q4_0_bytes(leaf)))
                continue
            dequantized.append(gname)
        permute = arch == "llama" and ours[0].split(".")[-2] in ("q", "k")
        heads = cfg.num_heads if ours[0].split(".")[-2] == "q" else cfg.num_kv_heads
        plan.append((gname, shape, qtype, lambda leaves=leaves, qtype=qtype, permute=permute, heads=heads:
                     _encode(leaves, qtype, heads if permute else 0)))
    if fallback:
        notes.append(f"{len(fallback)} matrices have rows not divisible by 32 and are stored f16 "
                     f"(e.g. {fallback[0]})")
    if direct:
        notes.append(f"{len(direct)} int4 (symmetric, group 32) leaves written directly as q4_0")
    if dequantized:
        notes.append(f"{len(dequantized)} quantized leaves dequantized and re-encoded as {type}")
    return plan


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape)


def _encode(leaves: list[Any], qtype: Any, permute_heads: int) -> np.ndarray:
    gguf = require_gguf()
    parts = [(leaf if isinstance(leaf, torch.Tensor) else leaf.dequantize(torch.float32)) for leaf in leaves]
    t = torch.cat([p.detach().float().cpu() for p in parts]) if len(parts) > 1 else parts[0].detach().float().cpu()
    if permute_heads:
        t = rope_permute(t, permute_heads)
    data = t.contiguous().numpy()
    if qtype == _t("F32"):
        return data
    if qtype == _t("F16"):
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _is_q4_0(leaf: Any) -> bool:
    """A symmetric int4 leaf in groups of 32: q4_0's layout (value = (code - 8) * scale)."""
    return getattr(leaf, "group_size", None) == 32 and getattr(leaf, "zero_points", 1) is None \
        and hasattr(leaf, "codes")


def _q4_0_bytes(leaf: Any) -> np.ndarray:
    """q4_0 blocks `[N, K/32 * 18]`: an f16 scale, then 16 bytes holding codes j (low nibble)
    and j + 16 (high nibble) of the block."""
    codes = leaf.codes().to(torch.uint8).cpu()  # [N, K], values 0..15
    n, k = codes.shape
    blocks = codes.reshape(n, k // 32, 32)
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)
    scales = leaf.scales.detach().to(torch.float16).cpu().reshape(n, k // 32, 1).view(torch.uint8)
    return torch.cat([scales, packed], dim=-1).reshape(n, k // 32 * 18).numpy()


# -- the tokenizer ---------------------------------------------------------------------------

def _tokenizer_metadata(tokenizer: str | Path | None, chat_template: str | None, cfg: ModelConfig,
                        notes: list[str]) -> list[tuple[str, tuple[Any, ...]]]:
    """GGUFWriter calls (method name, arguments) storing the tokenizer: a SentencePiece model as
    tokenizer model `llama` (tokens, scores, types, byte pieces), a `tokenizer.json` BPE as
    `gpt2` (tokens, types, merges); bos / eos / pad / unk ids; the chat template."""
    from pangu_fn.tokenizer import find_tokenizer

    file = None
    if tokenizer is not None:
        path = Path(tokenizer)
        file = find_tokenizer(path) if path.is_dir() else path
        if file is None or not file.is_file():
            raise FormatError(f"GGUF: tokenizer {tokenizer}: expected a tokenizer.model or tokenizer.json, found none")
    if file is None:
        notes.append("no tokenizer: the file holds no vocabulary (tokenizer model 'none'), so llama.cpp needs "
                     "token ids (pass tokenizer=... or --tokenizer)")
        return [("add_tokenizer_model", ("none",)), *_special_calls({}, 0, cfg)]
    config = _tokenizer_config(file.parent)
    reader = _sentencepiece_vocab if file.suffix == ".model" else _bpe_vocab
    tokens, scores, types, ids, calls = reader(file, config, notes)
    if len(tokens) > cfg.vocab_size:
        raise FormatError(f"GGUF: tokenizer {file} has {len(tokens)} tokens, more than the model's vocabulary "
                          f"{cfg.vocab_size}")
    pad = cfg.vocab_size - len(tokens)  # rows no token uses, named as llama.cpp's converter names them
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    types += [require_gguf().TokenType.UNUSED] * pad
    calls += [("add_token_list", (tokens,)), ("add_token_types", (types,))]
    if scores is not None:
        calls.append(("add_token_scores", (scores + [-10000.0] * pad,)))
    calls += _special_calls(ids, len(tokens), cfg)
    template = chat_template if chat_template is not None else config.get("chat_template")
    if isinstance(template, str):
        calls.append(("add_chat_template", (template,)))
    return calls


def _special_calls(ids: dict[str, int | None], n_tokens: int, cfg: ModelConfig) -> list[tuple[str, tuple[Any, ...]]]:
    """bos / eos / pad / unk id calls: the tokenizer's ids, else the model config's."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for kind in ("bos", "eos", "pad", "unk"):
        i = ids.get(kind)
        i = i if i is not None and 0 <= i < n_tokens else getattr(cfg, f"{kind}_token_id", None)
        if i is not None:
            calls.append((f"add_{kind}_token_id", (i,)))
    return calls


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{f}: not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def _special_id(config: dict[str, Any], kind: str, lookup: Callable[[str], int | None]) -> int | None:
    tok = config.get(f"{kind}_token")
    tok = tok.get("content") if isinstance(tok, dict) else tok
    return lookup(tok) if isinstance(tok, str) else None


Vocab = tuple[list[str], list[float] | None, list[int], dict[str, int | None], list[tuple[str, tuple[Any, ...]]]]


def _sentencepiece_vocab(file: Path, config: dict[str, Any], notes: list[str]) -> Vocab:
    """(tokens, scores, types, special ids, other writer calls) of a SentencePiece model;
    `added_tokens_decoder` entries of tokenizer_config.json become control / user tokens."""
    gguf = require_gguf()
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise ConfigError("GGUF: SentencePiece tokenizers need 'sentencepiece' and 'protobuf': "
                          "pip install 'pangu-fn[tokenizer,gguf]'") from None
    m = pb.ModelProto()
    try:
        m.ParseFromString(file.read_bytes())
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
        raise FormatError(f"{file}: not a SentencePiece model: {e}") from None
    tokens = [p.piece for p in m.pieces]
    scores = [p.score for p in m.pieces]
    types = [int(p.type) for p in m.pieces]  # SentencePiece's piece types are GGUF's token types
    index = {t: i for i, t in enumerate(tokens)}
    for key, tok in (config.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if isinstance(tok, dict) and i < len(tokens) and isinstance(tok.get("content"), str):
            tokens[i] = tok["content"]
            types[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED
    if m.normalizer_spec.precompiled_charsmap:
        notes.append(f"{file.name} normalizes text ({m.normalizer_spec.name or 'NFKC'} rules); GGUF's llama "
                     "tokenizer does not, so llama.cpp may split such text differently")
    spec = m.trainer_spec
    ids = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id, "unk": spec.unk_id}
    for kind in ("bos", "eos", "pad", "unk"):
        named = _special_id(config, kind, index.get)
        if named is not None:
            ids[kind] = named
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("add_tokenizer_model", ("llama",)), ("add_tokenizer_pre", ("default",)),
        ("add_add_space_prefix", (bool(m.normalizer_spec.add_dummy_prefix),)),
        ("add_remove_extra_whitespaces", (bool(m.normalizer_spec.remove_extra_whitespaces),)),
        ("add_add_bos_token", (bool(config.get("add_bos_token", False)),)),
        ("add_add_eos_token", (bool(config.get("add_eos_token", False)),))]
    return tokens, scores, types, {k: (i if i >= 0 else None) for k, i in ids.items()}, calls


def _bpe_vocab(file: Path, config: dict[str, Any], notes: list[str]) -> Vocab:
    """(tokens, None, types, special ids, other writer calls) of a byte-level BPE
    `tokenizer.json`; its added special tokens become control tokens."""
    gguf = require_gguf()
    try:
        d = json.loads(file.read_text())
        model = d["model"]
        vocab, merges = model["vocab"], model.get("merges", [])
    except (json.JSONDecodeError, OSError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{file}: expected a tokenizers JSON file with model.vocab, found {e!r}") from None
    if model.get("type") != "BPE":
        raise FormatError(f"{file}: GGUF export reads BPE tokenizer.json files (llama.cpp's gpt2 tokenizer), "
                          f"found model type {model.get('type')!r}")
    added = {t["id"]: t for t in d.get("added_tokens") or [] if isinstance(t, dict)}
    size = max([*vocab.values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    pre = d.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or [])
    if not byte_level:
        raise FormatError(f"{file}: GGUF's gpt2 tokenizer is byte-level BPE; this tokenizer.json's pre-tokenizer "
                          f"is {pre.get('type')!r}")
    index = {t: i for i, t in enumerate(tokens)}
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("add_tokenizer_model", ("gpt2",)), ("add_tokenizer_pre", ("gpt-2",)), ("add_token_merges", (merges,)),
        ("add_add_bos_token", (bool(config.get("add_bos_token", False)),))]
    return tokens, None, types, {k: _special_id(config, k, index.get) for k in ("bos", "eos", "pad", "unk")}, calls
