"""GGUF files (llama.cpp's format) read into a `Source`, and the name table both directions use.

Architectures: `pangu-embedded` (openPangu-Embedded: RMSNorm, SwiGLU, NEOX RoPE, q/k/v/o
biases), `llama` (the same network without biases; llama.cpp's converter permutes q/k rows for
its interleaved RoPE, undone here) and `gpt2` (the seed's GPT-style family: LayerNorm, GELU,
learned positions, fused `attn_qkv`). Tensor names and metadata keys come from the `gguf`
package's tables (`gguf.TENSOR_NAMES`, `gguf.Keys`), which are maintained with llama.cpp.
Tensors of type f32, f16, bf16, q8_0 and q4_0 are dequantized with `gguf.quants.dequantize`.
The tokenizer stored in the file (`tokenizer.ggml.*`) becomes `tokenizer.model` (SentencePiece,
tokenizer model `llama`) or `tokenizer.json` (BPE, tokenizer model `gpt2`) by `tokenizer_files`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from .source import Source, TensorRef

EXTRA = "pip install 'pangu-fn[gguf]'"
ARCHS = ("pangu-embedded", "llama", "gpt2")
MAGIC = b"GGUF"


def require_gguf() -> Any:
    """The `gguf` package, or ConfigError naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"GGUF files need the 'gguf' package: {EXTRA}") from None
    return gguf


def is_gguf(path: Path) -> bool:
    """A file named `*.gguf` or starting with the GGUF magic."""
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def arch_for(cfg: ModelConfig) -> str:
    """The llama.cpp architecture of a config: gpt -> `gpt2`; openPangu -> `pangu-embedded`
    (q/k/v/o biases) or `llama` (no biases). Raises ConfigError for PanGu-α (its top query
    layer has no llama.cpp architecture)."""
    if cfg.family == "alpha":
        raise ConfigError("GGUF: PanGu-α has no llama.cpp architecture (its top query layer attends with "
                          "position queries); export the gpt or openpangu families, or use ONNX (--target ort)")
    if cfg.family == "gpt":
        return "gpt2"
    return "pangu-embedded" if cfg.attn_bias else "llama"


def tensor_table(cfg: ModelConfig, arch: str) -> dict[str, list[str]]:
    """GGUF tensor name -> our flat names stacked (along rows) to make it, in file order:
    gpt2's `blk.N.attn_qkv` stacks q, k, v; every other tensor is one of ours."""
    gguf = require_gguf()
    T = gguf.MODEL_TENSOR
    known = set(gguf.MODEL_TENSORS[{"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA,
                                    "pangu-embedded": gguf.MODEL_ARCH.PANGU_EMBED}[arch]])

    def name(kind: Any, suffix: str, bid: int | None = None) -> str:
        if kind not in known:
            raise ConfigError(f"GGUF: architecture {arch!r} has no tensor {kind.name} in the gguf package's tables")
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix

    kinds = ["weight", "bias"] if cfg.norm == "layernorm" else ["weight"]
    table: dict[str, list[str]] = {name(T.TOKEN_EMBD, "weight"): ["tok_embed.weight"]}
    if cfg.positions == "learned":
        table[name(T.POS_EMBD, "weight")] = ["pos_embed.weight"]
    linear_kinds = {"attn": ["weight", "bias"] if cfg.attn_bias else ["weight"],
                    "mlp": ["weight", "bias"] if cfg.mlp_bias else ["weight"]}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        for k in kinds:
            table[name(T.ATTN_NORM, k, i)] = [f"{b}.attn_norm.{k}"]
        for k in linear_kinds["attn"]:
            if arch == "gpt2":
                table[name(T.ATTN_QKV, k, i)] = [f"{b}.attn.{p}.{k}" for p in "qkv"]
            else:
                for p, kind in (("q", T.ATTN_Q), ("k", T.ATTN_K), ("v", T.ATTN_V)):
                    table[name(kind, k, i)] = [f"{b}.attn.{p}.{k}"]
            table[name(T.ATTN_OUT, k, i)] = [f"{b}.attn.o.{k}"]
        for k in kinds:
            table[name(T.FFN_NORM, k, i)] = [f"{b}.mlp_norm.{k}"]
        parts = (("gate", T.FFN_GATE), ("up", T.FFN_UP), ("down", T.FFN_DOWN)) if cfg.mlp == "swiglu" else \
            (("up", T.FFN_UP), ("down", T.FFN_DOWN))
        for p, kind in parts:
            for k in linear_kinds["mlp"]:
                table[name(kind, k, i)] = [f"{b}.mlp.{p}.{k}"]
    for k in kinds:
        table[name(T.OUTPUT_NORM, k)] = [f"final_norm.{k}"]
    if not cfg.tie_embeddings:
        table[name(T.OUTPUT, "weight")] = ["lm_head.weight"]
    return table


def rope_permute(w: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's `llama` q/k row order (each head's rows as interleaved pairs, for its
    interleaved RoPE) from ours (LLaMA/NEOX halves), or back with `inverse`. `w [heads * D, ...]`."""
    d = w.shape[0] // heads
    if inverse:
        return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -- reading ---------------------------------------------------------------------------------

class GGUFFile:
    """A GGUF file opened with `gguf.GGUFReader` (memory-mapped): metadata values by key and
    tensors by name. Raises FormatError for a file that is not GGUF or is truncated."""

    def __init__(self, path: str | Path) -> None:
        gguf = require_gguf()
        self.path = Path(path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != MAGIC:
            raise FormatError(f"{self.path}: expected a GGUF file (magic b'GGUF'), found {magic!r}")
        try:
            self.reader = gguf.GGUFReader(self.path)
            self.tensors = {t.name: t for t in self.reader.tensors}
            for t in self.tensors.values():
                if t.data.nbytes != t.n_bytes:
                    raise ValueError(f"tensor {t.name}: {t.data.nbytes} of {t.n_bytes} bytes present")
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001  (the reader raises ValueError, IndexError, struct and numpy errors)
            raise FormatError(f"{self.path}: not a readable GGUF file (truncated or corrupt): {e}") from None

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{self.path}: metadata {key}: unreadable value: {e}") from None

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise FormatError(f"{self.path}: expected metadata key {key!r}, found none")
        return value

    @property
    def arch(self) -> str:
        return str(self.need("general.architecture"))

    def qtype(self, name: str) -> Any:
        return self.tensors[name].tensor_type

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` in numpy order (`[rows, cols]`), dequantized to float32 unless stored
        as f32 / f16."""
        gguf = require_gguf()
        t = self.tensors[name]
        T = gguf.GGMLQuantizationType
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        try:
            if t.tensor_type in (T.F32, T.F16):
                arr = np.array(t.data).reshape(shape)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise FormatError(f"{self.path}: tensor {name}: cannot read type {t.tensor_type.name}: {e}") from None
        return torch.from_numpy(np.ascontiguousarray(arr))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """ModelConfig from the metadata of a `pangu-embedded`, `llama` or `gpt2` file. Raises
    FormatError for other architectures, missing keys and what our model cannot express (RoPE
    scaling, partial rotary dimensions, per-layer head counts or widths)."""
    arch = f.arch
    if arch not in ARCHS:
        raise FormatError(f"{f.path}: general.architecture {arch!r} is not one pangu-fn reads; expected one of {ARCHS}")
    key = lambda k: k.format(arch=arch)
    gguf = require_gguf()
    K = gguf.Keys
    heads, kv_heads, ffn = (f.get(key(k)) for k in (K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV,
                                                      K.LLM.FEED_FORWARD_LENGTH))
    if heads is None or ffn is None:
        raise FormatError(f"{f.path}: expected {key(K.Attention.HEAD_COUNT)} and {key(K.LLM.FEED_FORWARD_LENGTH)}")
    for what, v in (("head counts", heads), ("KV head counts", kv_heads), ("feed-forward widths", ffn)):
        if isinstance(v, list) and len(set(v)) != 1:
            raise FormatError(f"{f.path}: per-layer {what} {v[:8]}...; pangu-fn reads uniform layers only")
    heads, kv_heads, ffn = (v[0] if isinstance(v, list) else v for v in (heads, kv_heads, ffn))
    hidden = int(f.need(key(K.LLM.EMBEDDING_LENGTH)))
    embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if embd not in f.tensors:
        raise FormatError(f"{f.path}: expected tensor {embd!r}, found none")
    head_dim = int(f.get(key(K.Attention.KEY_LENGTH)) or hidden // int(heads))
    tokens = {k: f.get(getattr(K.Tokenizer, k.upper() + "_ID")) for k in ("bos", "eos", "pad")}
    common = {"vocab_size": f.shape(embd)[0], "hidden_size": hidden, "num_layers": int(f.need(key(K.LLM.BLOCK_COUNT))),
              "num_heads": int(heads), "num_kv_heads": int(kv_heads or heads), "head_dim": head_dim,
              "intermediate_size": int(ffn), "max_seq_len": int(f.need(key(K.LLM.CONTEXT_LENGTH))),
              "tie_embeddings": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight" not in f.tensors,
              **{f"{k}_token_id": (int(v) if v is not None else None) for k, v in tokens.items()}}
    try:
        if arch == "gpt2":
            return ModelConfig(family="gpt", norm_eps=_f32(f.need(key(K.Attention.LAYERNORM_EPS))),
                               activation="gelu_tanh", **common)
        scaling = f.get(key(K.Rope.SCALING_TYPE))
        if scaling not in (None, "none") or f.get(key(K.Rope.SCALING_FACTOR)) not in (None, 1.0):
            raise FormatError(f"{f.path}: RoPE scaling {scaling!r} is not supported (plain RoPE only)")
        rot = f.get(key(K.Rope.DIMENSION_COUNT))
        if rot is not None and int(rot) != head_dim:
            raise FormatError(f"{f.path}: rotary dimension {rot} differs from the head size {head_dim}; "
                              "pangu-fn rotates whole heads")
        return ModelConfig(family="openpangu", norm="rmsnorm", mlp="swiglu", activation="silu", positions="rope",
                           norm_eps=_f32(f.need(key(K.Attention.LAYERNORM_RMS_EPS))),
                           rope_theta=_f32(f.get(key(K.Rope.FREQ_BASE), 10000.0)),
                           attn_bias="blk.0.attn_q.bias" in f.tensors, mlp_bias=False, **common)
    except ConfigError as e:
        raise FormatError(f"{f.path}: metadata gives an inconsistent config: {e}") from None


def _f32(x: Any) -> float:
    """The shortest decimal of a float32 metadata value (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def open_gguf(path: Path, hint: ModelConfig | None = None) -> Source:
    """A GGUF file as a Source (lazy tensors in our names and layout). The tree's dtype is f16
    or bf16 when every matrix is stored so, else float32 (quantized tensors are dequantized).
    Raises FormatError for unreadable files, other architectures, and tensors missing,
    unexpected or of the wrong shape."""
    f = GGUFFile(path)
    try:
        cfg = config_from_gguf(f)
    except (TypeError, ValueError, KeyError, IndexError) as e:  # a value of the wrong type or shape
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path}: metadata of the wrong type: {e!r}") from None
    arch = f.arch
    table = tensor_table(cfg, arch)
    unexpected = sorted(set(f.tensors) - set(table) - {"rope_freqs.weight"})
    missing = sorted(set(table) - set(f.tensors))
    if missing or unexpected:
        raise FormatError(f"{path}: tensors do not match a {arch} model of {cfg.num_layers} layers: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    dtype = _tree_dtype(f, table)
    refs: dict[str, TensorRef] = {}
    for gname, ours in table.items():
        rows = [_rows(cfg, arch, n) for n in ours]
        shape = f.shape(gname)
        if shape[0] != sum(rows) or len(shape) != (1 if ours[0].endswith("bias") or "norm" in ours[0] else 2):
            raise FormatError(f"{path}: tensor {gname}: expected {sum(rows)} rows for {ours}, found shape {list(shape)}")
        for j, name in enumerate(ours):
            start = sum(rows[:j])
            refs[name] = TensorRef((rows[j], *shape[1:]), dtype, _reader(f, gname, name, cfg, arch, start, rows[j], dtype))
    return Source(Path(path), "gguf", cfg, refs)


def _tree_dtype(f: GGUFFile, table: dict[str, list[str]]) -> torch.dtype:
    gguf = require_gguf()
    T = gguf.GGMLQuantizationType
    position = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"  # kept f32 whatever the type
    types = {f.qtype(n) for n in table if len(f.shape(n)) == 2 and n != position}
    return {frozenset([T.F16]): torch.float16, frozenset([T.BF16]): torch.bfloat16}.get(frozenset(types), torch.float32)


def _rows(cfg: ModelConfig, arch: str, name: str) -> int:
    """Rows of our tensor `name` (the config's uniform widths)."""
    part = name.split(".")
    if name.startswith("blocks.") and part[2] == "attn" and part[3] in "qkv":
        heads = cfg.num_heads if part[3] == "q" else cfg.num_kv_heads
        return heads * cfg.head_dim
    if name.startswith("blocks.") and part[2] == "mlp" and part[3] in ("gate", "up"):
        return cfg.intermediate_size
    if name in ("tok_embed.weight", "lm_head.weight"):
        return cfg.vocab_size
    if name == "pos_embed.weight":
        return cfg.max_seq_len
    return cfg.hidden_size


def _reader(f: GGUFFile, gname: str, name: str, cfg: ModelConfig, arch: str, start: int, rows: int,
            dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        t = f.read(gname)[start:start + rows]
        if arch == "llama" and name.split(".")[-2] in ("q", "k"):
            t = rope_permute(t, cfg.num_heads if name.split(".")[-2] == "q" else cfg.num_kv_heads, inverse=True)
        return t.to(dtype).contiguous()
    return read


# -- the tokenizer -----------------------------------------------------------------------------

def tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The tokenizer stored in a GGUF file as files for a model folder: `tokenizer.model`
    (a SentencePiece BPE model rebuilt from tokens, scores and types) for tokenizer model
    `llama`, `tokenizer.json` for `gpt2` (byte-level BPE with its merges), plus
    `tokenizer_config.json` (bos / eos / pad tokens, special tokens, chat template). Empty when
    the file stores no tokenizer. Raises FormatError for other tokenizer models or malformed
    tokenizer metadata."""
    f = GGUFFile(path)
    try:
        return _tokenizer_files(f)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{f.path}: tokenizer metadata of the wrong type: {e!r}") from None


def _tokenizer_files(f: GGUFFile) -> dict[str, bytes]:
    gguf = require_gguf()
    K = gguf.Keys.Tokenizer
    model = f.get(K.MODEL)
    if model is None:
        return {}
    tokens = f.need(K.LIST)
    types = f.get(K.TOKEN_TYPE) or [1] * len(tokens)
    ids = {k: f.get(getattr(K, k.upper() + "_ID")) for k in ("bos", "eos", "pad", "unk")}
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    if model == "llama":
        proto, own = _sentencepiece_model(f, tokens, types, ids)
        files = {"tokenizer.model": proto}
    elif model == "gpt2":
        files, own = {"tokenizer.json": _bpe_json(f, tokens, control)}, set()
    else:
        raise FormatError(f"{f.path}: tokenizer model {model!r} is not one pangu-fn rebuilds; expected 'llama' or 'gpt2'")
    config: dict[str, Any] = {f"{k}_token": tokens[v] for k, v in ids.items() if v is not None and v < len(tokens)}
    added = {str(i): {"content": tokens[i], "special": True} for i in sorted(control - own)}
    if added and model == "llama":
        config["added_tokens_decoder"] = added
    template = f.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    if template is not None:
        config["chat_template"] = template
    for key, flag in (("add_bos_token", K.ADD_BOS), ("add_eos_token", K.ADD_EOS)):
        if f.get(flag) is not None:
            config[key] = bool(f.get(flag))
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    return files


def _sentencepiece_model(f: GGUFFile, tokens: list[str], types: list[int],
                         ids: dict[str, int | None]) -> tuple[bytes, set[int]]:
    """A SentencePiece ModelProto (BPE, identity normalizer) and the ids it marks as its own
    bos / eos / pad (`<s>`, `</s>`, `<pad>` when present, else the file's ids)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise ConfigError("rebuilding a SentencePiece tokenizer needs 'sentencepiece' and 'protobuf': "
                          "pip install 'pangu-fn[tokenizer,gguf]'") from None
    gguf = require_gguf()
    K = gguf.Keys.Tokenizer
    scores = f.get(K.SCORES) or [0.0] * len(tokens)
    m = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        m.pieces.add(piece=text, score=float(score), type=int(kind) if int(kind) in (1, 2, 3, 4, 5, 6) else 1)
    index = {p: i for i, p in enumerate(tokens)}
    own: dict[str, int] = {}
    for kind, piece in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>")):
        i = index.get(piece)
        own[kind] = i if i is not None and types[i] == gguf.TokenType.CONTROL else (ids[kind] if ids[kind] is not None else -1)
    unk = next((i for i, t in enumerate(types) if t == gguf.TokenType.UNKNOWN), ids["unk"])
    if unk is None:
        raise FormatError(f"{f.path}: a SentencePiece (llama) tokenizer needs an unknown token; found none")
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(t == gguf.TokenType.BYTE for t in types)
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk, own["bos"], own["eos"], own["pad"]
    norm = m.normalizer_spec
    norm.name = "identity"
    add_prefix = f.get(K.ADD_PREFIX)
    norm.add_dummy_prefix = True if add_prefix is None else bool(add_prefix)
    norm.remove_extra_whitespaces = bool(f.get(K.REMOVE_EXTRA_WS) or False)
    norm.escape_whitespaces = True
    return m.SerializeToString(), {i for i in own.values() if i >= 0} | {unk}


def _bpe_json(f: GGUFFile, tokens: list[str], control: set[int]) -> bytes:
    """A byte-level BPE `tokenizer.json` (GPT-2's pre-tokenizer and decoder) from the file's
    tokens and merges; control tokens become special added tokens."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ConfigError("rebuilding a BPE tokenizer needs the 'tokenizers' package: "
                          "pip install 'pangu-fn[tokenizer]'") from None
    gguf = require_gguf()
    merges = [tuple(m.split(" ", 1)) for m in (f.get(gguf.Keys.Tokenizer.MERGES) or [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for merges of unknown tokens)
        raise FormatError(f"{f.path}: tokenizer.ggml.merges do not fit the token list: {e}") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True) for i in sorted(control)])
    return tok.to_str().encode()
