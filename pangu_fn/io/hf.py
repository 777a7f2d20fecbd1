"""Hugging Face layouts: GPT-2 (`GPT2LMHeadModel`, Conv1D weights stored [in, out]) for the
GPT-style family and LLaMA (`LlamaForCausalLM`, also openPangu-Embedded's
`PanguEmbeddedForCausalLM`) for the openPangu family. Both directions: an HF state dict and
config -> our flat names and ModelConfig, and back (so transformers loads what we write)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..params import Params, layer_sizes, parse_dtype
from ..tree import flatten

LLAMA_TYPES = ("llama", "PanguEmbedded", "pangu_embedded", "openpangu_dense")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
GELU_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "fast_gelu"}


def is_hf_config(d: Mapping[str, Any]) -> bool:
    return d.get("model_type") == "gpt2" or d.get("model_type") in LLAMA_TYPES


_MISSING = object()
MAX_SIZE = 2**31 - 1  # sizes must fit in int32


def _field(d: Mapping[str, Any], key: str, kind: str, default: Any = _MISSING, *, where: str) -> Any:
    """`d[key]` checked to be `kind` ("size": an int in [1, MAX_SIZE], "id": a token id or
    null, "float": a finite number, "bool", "str"); `default` when absent (required without).
    Raises ConfigError naming the key, what was expected and what was found."""
    if key not in d or (d[key] is None and kind != "id"):
        if default is _MISSING:
            raise ConfigError(f"{where}: missing key {key!r} ({kind})")
        return default
    value = d[key]
    ok = {"size": lambda v: type(v) is int and 1 <= v <= MAX_SIZE,
          "id": lambda v: v is None or (type(v) is int and 0 <= v <= MAX_SIZE),
          "float": lambda v: type(v) in (int, float) and math.isfinite(v),
          "bool": lambda v: type(v) is bool, "str": lambda v: type(v) is str}[kind](value)
    if not ok:
        expected = {"size": f"an integer in [1, {MAX_SIZE}]", "id": "a token id (a non-negative integer) or null",
                    "float": "a finite number", "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"{where}: {key!r} expected {expected}, found {repr(value)[:80]}")
    return value


def _eos(d: Mapping[str, Any], where: str) -> int | None:
    eos = d.get("eos_token_id")
    if isinstance(eos, list):  # several end tokens: the first one stops generation
        if not eos:
            return None
        eos = eos[0]
    return _field({"eos_token_id": eos}, "eos_token_id", "id", None, where=where)


def config_from_hf(d: Mapping[str, Any], where: str = "Hugging Face config.json") -> ModelConfig:
    """ModelConfig from a GPT-2 or LLaMA/openPangu `config.json` dict. Raises ConfigError
    naming the key for a missing key, a value of the wrong type or range (string numbers,
    `n_head: 0`), sizes that do not divide, or an unsupported feature."""
    mt = d.get("model_type")
    if mt == "gpt2":
        where = f"{where} (gpt2)"
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ConfigError(f"{where}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        act = d.get("activation_function", "gelu_new")
        if not isinstance(act, str) or act not in GELU_NAMES:
            raise ConfigError(f"{where}: activation_function {str(act)[:40]!r} not in {sorted(GELU_NAMES)}")
        h, heads = _field(d, "n_embd", "size", where=where), _field(d, "n_head", "size", where=where)
        if h % heads:
            raise ConfigError(f"{where}: n_embd {h} is not divisible by n_head {heads}")
        return _config(where, family="gpt", vocab_size=_field(d, "vocab_size", "size", where=where), hidden_size=h,
                       num_layers=_field(d, "n_layer", "size", where=where), num_heads=heads, num_kv_heads=heads,
                       head_dim=h // heads, intermediate_size=_field(d, "n_inner", "size", 4 * h, where=where),
                       max_seq_len=_field(d, "n_positions", "size", where=where),
                       norm_eps=_field(d, "layer_norm_epsilon", "float", 1e-5, where=where),
                       activation=GELU_NAMES[act],
                       tie_embeddings=_field(d, "tie_word_embeddings", "bool", True, where=where),
                       bos_token_id=_field(d, "bos_token_id", "id", None, where=where), eos_token_id=_eos(d, where),
                       pad_token_id=_field(d, "pad_token_id", "id", None, where=where))
    if isinstance(mt, str) and mt in LLAMA_TYPES:
        where = f"{where} ({mt})"
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope_parameters / rope_scaling expected an object, found {str(rope)[:80]!r}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope scaling {str(rope)[:120]} is not supported (default RoPE only)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: expected hidden_act 'silu', found {str(d.get('hidden_act'))[:40]!r}")
        hidden, heads = _field(d, "hidden_size", "size", where=where), _field(d, "num_attention_heads", "size", where=where)
        head_dim = _field(d, "head_dim", "size", hidden // heads or 1, where=where)
        if "head_dim" not in d and hidden % heads:
            raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                              "(and no head_dim is given)")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        theta = _field({"rope_theta": theta}, "rope_theta", "float", where=where)
        bias = d.get("attention_bias", d.get("bias", False))
        bias = False if bias is None else bias
        return _config(where, family="openpangu", vocab_size=_field(d, "vocab_size", "size", where=where),
                       hidden_size=hidden, num_layers=_field(d, "num_hidden_layers", "size", where=where),
                       num_heads=heads, num_kv_heads=_field(d, "num_key_value_heads", "size", heads, where=where),
                       head_dim=head_dim, intermediate_size=_field(d, "intermediate_size", "size", where=where),
                       max_seq_len=_field(d, "max_position_embeddings", "size", 2048, where=where), norm="rmsnorm",
                       norm_eps=_field(d, "rms_norm_eps", "float", 1e-6, where=where), mlp="swiglu",
                       activation="silu", positions="rope", rope_theta=float(theta),
                       tie_embeddings=_field(d, "tie_word_embeddings", "bool", False, where=where),
                       attn_bias=_field({"bias": bias}, "bias", "bool", where=where),
                       mlp_bias=_field(d, "mlp_bias", "bool", False, where=where),
                       bos_token_id=_field(d, "bos_token_id", "id", None, where=where), eos_token_id=_eos(d, where),
                       pad_token_id=_field(d, "pad_token_id", "id", None, where=where))
    raise ConfigError(f"{where}: unsupported Hugging Face model_type {str(mt)[:40]!r}; expected 'gpt2' or one of "
                      f"{LLAMA_TYPES}")


def _config(where: str, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def hf_to_flat(get: Callable[[str], torch.Tensor], keys: list[str], cfg: ModelConfig,
               source: str = "state dict") -> dict[str, torch.Tensor]:
    """Our flat `{dotted_name: tensor}` from an HF GPT-2 or LLaMA state dict (accessed by
    `get(name)`). Raises FormatError naming unexpected or missing tensors."""
    names = _gpt2_names if cfg.family == "gpt" else _llama_names
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in key_set:
            raise FormatError(f"{source}: missing tensor {name!r}")
        used.add(name)
        return get(name)

    key_set = set(keys)
    flat = names(cfg, take)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")
    unexpected = [k for k in keys if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise FormatError(f"{source}: unexpected tensors {unexpected[:5]} for a {cfg.family} model")
    return flat


def _gpt2_names(cfg: ModelConfig, take: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    h = cfg.hidden_size
    flat = {"tok_embed.weight": take("transformer.wte.weight"), "pos_embed.weight": take("transformer.wpe.weight")}
    for i in range(cfg.num_layers):
        src, dst = f"transformer.h.{i}", f"blocks.{i}"
        for a, b in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            flat[f"{dst}.{b}.weight"] = take(f"{src}.{a}.weight")
            flat[f"{dst}.{b}.bias"] = take(f"{src}.{a}.bias")
        qkv_w, qkv_b = take(f"{src}.attn.c_attn.weight"), take(f"{src}.attn.c_attn.bias")  # [H, 3H], [3H]
        for j, part in enumerate("qkv"):
            flat[f"{dst}.attn.{part}.weight"] = qkv_w[:, j * h:(j + 1) * h].t().contiguous()
            flat[f"{dst}.attn.{part}.bias"] = qkv_b[j * h:(j + 1) * h].clone()
        for a, b in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            flat[f"{dst}.{b}.weight"] = take(f"{src}.{a}.weight").t().contiguous()
            flat[f"{dst}.{b}.bias"] = take(f"{src}.{a}.bias")
    flat["final_norm.weight"] = take("transformer.ln_f.weight")
    flat["final_norm.bias"] = take("transformer.ln_f.bias")
    if not cfg.tie_embeddings:
        flat["lm_head.weight"] = take("lm_head.weight")
    return flat


def _llama_names(cfg: ModelConfig, take: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = {"tok_embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        flat[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        flat[f"{dst}.mlp_norm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        for p in "qkvo":
            flat[f"{dst}.attn.{p}.weight"] = take(f"{src}.self_attn.{p}_proj.weight")
            if cfg.attn_bias:
                flat[f"{dst}.attn.{p}.bias"] = take(f"{src}.self_attn.{p}_proj.bias")
        for p in ("gate", "up", "down"):
            flat[f"{dst}.mlp.{p}.weight"] = take(f"{src}.mlp.{p}_proj.weight")
            if cfg.mlp_bias:
                flat[f"{dst}.mlp.{p}.bias"] = take(f"{src}.mlp.{p}_proj.bias")
    flat["final_norm.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        flat["lm_head.weight"] = take("lm_head.weight")
    return flat


def to_hf(params: Params, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config.json dict) that `GPT2LMHeadModel` or `LlamaForCausalLM` load.
    Raises ConfigError for models HF cannot express (PanGu-α's query layer, layers of
    different widths, quantized leaves)."""
    if cfg.family == "alpha":
        raise ConfigError("to_hf: PanGu-α (query layer) has no GPT-2/LLaMA layout; use the gpt_pangu writer")
    for i, blk in enumerate(params["blocks"]):
        if layer_sizes(blk, cfg) != layer_sizes(params["blocks"][0], cfg) or \
                layer_sizes(blk, cfg).num_heads != cfg.num_heads:
            raise ConfigError(f"to_hf: block {i} has widths {layer_sizes(blk, cfg)}, unlike the config; "
                              "Hugging Face layouts need uniform layers")
    flat = flatten(params)
    for name, leaf in flat.items():
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(f"to_hf: {name} is a {type(leaf).__name__}; dequantize before writing HF layouts")
    if cfg.family == "gpt":
        return _gpt2_state(flat, cfg), _gpt2_config(cfg)
    return _llama_state(flat, cfg), _llama_config(cfg)


def _gpt2_state(flat: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"transformer.wte.weight": flat["tok_embed.weight"], "transformer.wpe.weight": flat["pos_embed.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}", f"transformer.h.{i}"
        for a, b in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            sd[f"{dst}.{a}.weight"], sd[f"{dst}.{a}.bias"] = flat[f"{src}.{b}.weight"], flat[f"{src}.{b}.bias"]
        sd[f"{dst}.attn.c_attn.weight"] = torch.cat([flat[f"{src}.attn.{p}.weight"] for p in "qkv"], 0).t().contiguous()
        sd[f"{dst}.attn.c_attn.bias"] = torch.cat([flat[f"{src}.attn.{p}.bias"] for p in "qkv"])
        for a, b in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            sd[f"{dst}.{a}.weight"] = flat[f"{src}.{b}.weight"].t().contiguous()
            sd[f"{dst}.{a}.bias"] = flat[f"{src}.{b}.bias"]
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = flat["final_norm.weight"], flat["final_norm.bias"]
    sd["lm_head.weight"] = flat["tok_embed.weight"] if cfg.tie_embeddings else flat["lm_head.weight"]
    return sd


def _llama_state(flat: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": flat["tok_embed.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        sd[f"{dst}.input_layernorm.weight"] = flat[f"{src}.attn_norm.weight"]
        sd[f"{dst}.post_attention_layernorm.weight"] = flat[f"{src}.mlp_norm.weight"]
        for name, leaf in flat.items():
            if name.startswith((f"{src}.attn.", f"{src}.mlp.")):
                _, _, group, p, kind = name.split(".")
                sd[f"{dst}.{'self_attn' if group == 'attn' else 'mlp'}.{p}_proj.{kind}"] = leaf
    sd["model.norm.weight"] = flat["final_norm.weight"]
    sd["lm_head.weight"] = flat["tok_embed.weight"] if cfg.tie_embeddings else flat["lm_head.weight"]
    return sd


def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.norm != "layernorm" or cfg.num_kv_heads != cfg.num_heads or not (cfg.attn_bias and cfg.mlp_bias):
        raise ConfigError(f"to_hf: {cfg} does not fit GPT-2 (LayerNorm, MHA, biases)")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "fast_gelu": "quick_gelu"}.get(cfg.activation)
    if act is None:
        raise ConfigError(f"to_hf: GPT-2 has no activation {cfg.activation!r}; expected gelu_tanh, gelu or fast_gelu")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.intermediate_size, "activation_function": act,
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _llama_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def save_hf(path: str | Path, params: Params, cfg: ModelConfig, dtype: str | torch.dtype | None = None,
            shard_size: int = 5 * 1024**3, extra_files: dict[str, bytes] | None = None,
            on_tensor: Callable[[str, int], None] | None = None, *, overwrite: bool = False) -> Path:
    """Write a Hugging Face folder atomically (an existing `path` is replaced only with
    `overwrite`, see `destination.check_destination`): `config.json` + `model.safetensors` (or
    `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json` past `shard_size`).
    The gpt family becomes GPT-2 (`GPT2LMHeadModel.from_pretrained(path)`); openPangu becomes
    the LLaMA layout (`LlamaForCausalLM.from_pretrained(path)`: `attention_bias` set from the
    q/k/v/o biases, plus openPangu's own `bias` key). A tied head is stored once, as
    transformers expects. Floating tensors are cast to `dtype` if given. Raises ConfigError for
    PanGu-α (see `io/alpha.py`'s gpt_pangu writer) and trees HF cannot express."""
    from .atomic import atomic_dir
    from .destination import check_destination
    from .safetensors_io import write_sharded

    check_destination(path, overwrite=overwrite)
    state, config = to_hf(params, cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    if cfg.family == "openpangu":
        config["bias"] = cfg.attn_bias
    cast = parse_dtype(dtype) if dtype is not None else None
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    stored = cast or (floats.pop() if len(floats) == 1 else torch.float32)
    config["torch_dtype"] = str(stored).replace("torch.", "")
    plan = [(name, cast if cast is not None and t.is_floating_point() else t.dtype, tuple(t.shape))
            for name, t in state.items()]
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_sharded(tmp, plan, state.__getitem__, shard_size, {"format": "pt"}, on_tensor)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)
