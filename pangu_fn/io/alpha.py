"""PanGu-α checkpoint layouts: MindSpore `.ckpt` (three namings: the 2021 release's, the
late-2021 model zoo's, mindformers'), the Hugging Face `gpt_pangu` port, and the Megatron GPU
port; readers into a `Source`, name plans for the MindSpore and gpt_pangu writers, and configs
from mindformers run yamls.

Facts (from `reference/pangu-checkpoints.md`): MindSpore's `nn.Dense` (q/k/v) stores
`[out, in]` like torch, its `Mapping` weights (attention `projection`, `output.mapping`,
`output.projection`) store `[in, out]` and are transposed. The query layer is a separate top
block (`top_query_layer`, HF `h.{L-1}`, Megatron `topQueryLayer`); HF's `num_layers` counts
it, ours does not. The head is tied to the word embedding (HF ports store a copy as
`lm_head.weight`). Vocabulary rows are kept as stored: the 13B HF/Megatron ports pad 40000
to 40064, and `vocab_size` then is 40064 (ids >= 40000 are padding the tokenizer never emits).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from .mindspore import CheckpointReader, is_training_entry
from .source import Source, TensorRef, WeightFiles, config_from_shapes

# hidden size -> heads of the released PanGu-α models (350M, 2.6B, 13B, 200B)
KNOWN_HEADS = {1024: 16, 2560: 32, 5120: 40, 16384: 128}

# our block suffix -> (MindSpore suffix, stored [in, out] so transposed), in the order
# mindformers' PanguAlphaHeadModel lists (and saves) a block's parameters
MS_BLOCK = {
    "attn_norm.weight": ("layernorm1.gamma", False), "attn_norm.bias": ("layernorm1.beta", False),
    "mlp_norm.weight": ("layernorm2.gamma", False), "mlp_norm.bias": ("layernorm2.beta", False),
    "attn.o.weight": ("attention.projection.weight", True), "attn.o.bias": ("attention.projection.bias", False),
    "attn.q.weight": ("attention.dense1.weight", False), "attn.q.bias": ("attention.dense1.bias", False),
    "attn.k.weight": ("attention.dense2.weight", False), "attn.k.bias": ("attention.dense2.bias", False),
    "attn.v.weight": ("attention.dense3.weight", False), "attn.v.bias": ("attention.dense3.bias", False),
    "mlp.up.weight": ("output.mapping.weight", True), "mlp.up.bias": ("output.mapping.bias", False),
    "mlp.down.weight": ("output.projection.weight", True), "mlp.down.bias": ("output.projection.bias", False),
}


@dataclass(frozen=True)
class MindSporeNaming:
    """One MindSpore naming of PanGu-α: its word, position and query embedding names (every
    other name is shared) and the activation its model code uses by default, which is what a
    `.ckpt` of that naming is assumed to use when no config says otherwise."""

    name: str
    word: str
    position: str
    query: str
    activation: str
    what: str


MS_NAMINGS = {n.name: n for n in (
    MindSporeNaming("release", "backbone.word_embedding.embedding_table", "backbone.position_embedding.embedding_table",
                    "backbone.top_query_embedding.embedding_table", "gelu_tanh",
                    "the 2021 release's PanGu-α code"),
    MindSporeNaming("modelzoo", "embedding_table", "backbone.embedding.embedding.position_embedding.embedding_table",
                    "backbone.top_query_embedding_table", "gelu_tanh", "the late-2021 MindSpore model zoo PanGu-α code"),
    MindSporeNaming("mindformers", "backbone.embedding.word_embedding.embedding_table",
                    "backbone.embedding.position_embedding.embedding_table",
                    "backbone.top_query_embedding.embedding_table", "fast_gelu",
                    "mindformers' PanguAlphaHeadModel"),
)}
MINDFORMERS_ACTIVATIONS = {"fast_gelu": "fast_gelu", "gelu": "gelu_tanh"}  # hidden_act -> ours (nn.GELU is tanh)
HF_BLOCK = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn.q.weight": "attn.q_proj.weight", "attn.q.bias": "attn.q_proj.bias",
    "attn.k.weight": "attn.k_proj.weight", "attn.k.bias": "attn.k_proj.bias",
    "attn.v.weight": "attn.v_proj.weight", "attn.v.bias": "attn.v_proj.bias",
    "attn.o.weight": "attn.c_proj.weight", "attn.o.bias": "attn.c_proj.bias",
    "mlp_norm.weight": "ln_2.weight", "mlp_norm.bias": "ln_2.bias",
    "mlp.up.weight": "mlp.c_fc.weight", "mlp.up.bias": "mlp.c_fc.bias",
    "mlp.down.weight": "mlp.c_proj.weight", "mlp.down.bias": "mlp.c_proj.bias",
}
HF_ALIASES = {".attn.c_proj.": ".attn.out_proj."}  # one converter names the output projection out_proj
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers stored in .bin files
MEGATRON_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
    "attn.q.weight": "attention.query.weight", "attn.q.bias": "attention.query.bias",
    "attn.k.weight": "attention.key.weight", "attn.k.bias": "attention.key.bias",
    "attn.v.weight": "attention.value.weight", "attn.v.bias": "attention.value.bias",
    "attn.o.weight": "attention.dense.weight", "attn.o.bias": "attention.dense.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight", "mlp_norm.bias": "post_attention_layernorm.bias",
    "mlp.up.weight": "mlp.dense_h_to_4h.weight", "mlp.up.bias": "mlp.dense_h_to_4h.bias",
    "mlp.down.weight": "mlp.dense_4h_to_h.weight", "mlp.down.bias": "mlp.dense_4h_to_h.bias",
}
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
              "quick_gelu": "fast_gelu"}


def _count_blocks(names: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(found) + 1 if found else 0


def _resolve(table: Mapping[str, tuple[str, bool]], refs: Mapping[str, TensorRef], source: str,
             ignore: tuple[str, ...] = (), aliases: Mapping[str, str] | None = None
             ) -> tuple[dict[str, TensorRef], list[str]]:
    """Our flat name -> TensorRef for `table` (our name -> (stored name, transposed)); raises
    FormatError listing every missing and every unexpected stored name. Returns the refs and
    the stored names ignored (`ignore` suffixes)."""
    out, used, missing = {}, set(), []
    for ours, (stored, transpose) in table.items():
        name = stored
        if name not in refs and aliases:
            for a, b in aliases.items():
                if a in name and name.replace(a, b) in refs:
                    name = name.replace(a, b)
        if name not in refs:
            missing.append(stored)
            continue
        used.add(name)
        out[ours] = refs[name].transposed() if transpose else refs[name]
    ignored = [n for n in refs if n not in used and n.endswith(ignore)] if ignore else []
    unexpected = [n for n in refs if n not in used and n not in ignored]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        raise FormatError(f"{source}: " + "; ".join(parts))
    return out, ignored


def _table(layers: int, block: Mapping[str, str], block_prefix: str, query_prefix: str,
           top: Mapping[str, str]) -> dict[str, tuple[str, bool]]:
    """Our flat name -> (stored name, False) for a layout storing torch's orientation."""
    table = {ours: (stored, False) for ours, stored in top.items()}
    for i in range(layers):
        table.update({f"blocks.{i}.{suffix}": (f"{block_prefix}{i}.{stored}", False) for suffix, stored in block.items()})
    table.update({f"query_layer.{suffix}": (f"{query_prefix}{stored}", False) for suffix, stored in block.items()})
    return table


# -- MindSpore ---------------------------------------------------------------------------------

def mindspore_table(layers: int, naming: str = "release") -> dict[str, tuple[str, bool]]:
    """Our flat name -> (MindSpore name, transposed) for `layers` ordinary blocks, in
    mindformers' parameter order (embeddings, final norm, blocks, query embedding and layer)."""
    n = MS_NAMINGS[naming]
    table = {"tok_embed.weight": (n.word, False), "pos_embed.weight": (n.position, False),
             "final_norm.weight": ("backbone.layernorm.gamma", False),
             "final_norm.bias": ("backbone.layernorm.beta", False)}
    for i in range(layers):
        table.update({f"blocks.{i}.{ours}": (f"backbone.blocks.{i}.{stored}", t) for ours, (stored, t) in MS_BLOCK.items()})
    table["query_embed.weight"] = (n.query, False)
    table.update({f"query_layer.{ours}": (f"backbone.top_query_layer.{stored}", t) for ours, (stored, t) in MS_BLOCK.items()})
    return table


def open_mindspore(path: Path, hint: ModelConfig | None = None) -> Source:
    """A PanGu-α MindSpore `.ckpt` in any naming of `MS_NAMINGS` (detected from the word
    embedding's name). Optimizer and training entries are skipped and listed in
    `Source.skipped`. A `.ckpt` stores no activation: without `hint` the naming's default is
    assumed, and `Source.notes` says so. Raises FormatError for other files."""
    reader = CheckpointReader(path)
    skipped = [n for n, e in reader.entries.items() if is_training_entry(n) or not e.is_tensor]
    refs = {n: TensorRef(e.shape, e.dtype, lambda n=n: reader.read(n),  # type: ignore[arg-type]
                         read_part=(lambda dim, a, b, n=n: reader.read_part(n, dim, a, b)) if 1 <= len(e.shape) <= 2 else None)
            for n, e in reader.entries.items() if n not in skipped}
    naming = next((n for n in MS_NAMINGS.values() if n.word in refs), None)
    if naming is None:
        raise FormatError(f"{path}: no PanGu-α word embedding; expected one of "
                          f"{[n.word for n in MS_NAMINGS.values()]}, found names {list(refs)[:6]}")
    if not any(n.startswith("backbone.top_query_layer.") for n in refs):
        raise FormatError(f"{path}: no backbone.top_query_layer.*; the pipeline-training layout (query layer "
                          "stored as the last block) is not supported")
    layers = _count_blocks(list(refs), "backbone.blocks.")
    flat, _ = _resolve(mindspore_table(layers, naming.name), refs, str(path))
    cfg = config_from_shapes("alpha", {k: r.shape for k, r in flat.items()}, hint, KNOWN_HEADS, str(path))
    if hint is None:
        cfg = cfg.replace(activation=naming.activation)
        notes = [(f"activation {naming.activation} assumed: a .ckpt stores none, and {naming.what} uses it by default; "
                 "pass --config (a mindformers run yaml, config.json or preset) if the model was trained with another")]
    else:
        notes = [f"activation {cfg.activation} from the config given"]
        if cfg.activation != naming.activation:
            notes[0] += f" ({naming.what} uses {naming.activation} by default)"
    return Source(path, f"mindspore ({naming.name} names)", cfg.replace(source_layout=naming.name), flat,
                  skipped=skipped, folder=path.parent, notes=notes)


def mindspore_naming(cfg: ModelConfig, naming: str | None = None) -> MindSporeNaming:
    """`naming` if given, else the naming the model was read from, else the release's.
    Raises ConfigError for an unknown name."""
    name = naming or (cfg.source_layout if cfg.source_layout in MS_NAMINGS else "release")
    if name not in MS_NAMINGS:
        raise ConfigError(f"MindSpore layout {name!r}: expected one of {list(MS_NAMINGS)}")
    return MS_NAMINGS[name]


def mindspore_plan(cfg: ModelConfig, names: list[str], naming: str | None = None) -> list[tuple[str, str, bool]]:
    """(MindSpore name, our flat name, transpose) for writing a PanGu-α tree in `naming`
    (see `mindspore_naming`). Raises ConfigError for other families, an untied head or an
    unknown naming."""
    n = mindspore_naming(cfg, naming)
    if cfg.family != "alpha":
        raise ConfigError(f"the MindSpore writer writes PanGu-α (family 'alpha'); this model is {cfg.family!r}")
    if "lm_head.weight" in names:
        raise ConfigError("the PanGu-α MindSpore layout has a tied head; this model stores lm_head.weight")
    return [(stored, ours, t) for ours, (stored, t) in mindspore_table(cfg.num_layers, n.name).items()]


def mindspore_notes(cfg: ModelConfig, naming: str | None = None) -> list[str]:
    """What a reader of the written `.ckpt` must be told: the activation, when it differs from
    the one that naming's model code (and our reader) assumes."""
    n = mindspore_naming(cfg, naming)
    if cfg.activation == n.activation:
        return []
    return [(f"this model uses activation {cfg.activation}, but {n.what} uses {n.activation} by default and a "
             f".ckpt stores none: load it with a config that says {cfg.activation} (pangu convert --config ...)")]


def read_mindformers_yaml(path: Path) -> ModelConfig:
    """ModelConfig from a mindformers run yaml (`model.model_config` of type PanguAlphaConfig,
    e.g. `run_pangualpha_2_6b.yaml`) or a bare PanguAlphaConfig yaml. Raises ConfigError."""
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: reading a mindformers yaml needs PyYAML: pip install 'pangu-fn[mindformers]'") from None
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: expected a mindformers yaml, found an unreadable file: {e}") from None
    return mindformers_config(d, str(path))


def mindformers_config(d: Any, where: str) -> ModelConfig:
    """ModelConfig from a mindformers run config (dict): its `model.model_config`, or a bare
    PanguAlphaConfig (`type: PanguAlphaConfig` or `model_type: pangualpha`). PanguAlphaConfig's
    defaults fill missing keys (`num_layers` counts the query layer; `hidden_act` fast_gelu;
    LayerNorm eps 1e-5). Raises ConfigError for other models, values of the wrong type and
    settings pangu-fn does not compute."""
    model = d.get("model") if isinstance(d, dict) else None
    if isinstance(model, dict) and isinstance(model.get("model_config"), dict):
        mc, at = model["model_config"], "model.model_config"
    elif isinstance(d, dict) and (d.get("type") == "PanguAlphaConfig" or d.get("model_type") == "pangualpha"):
        mc, at = d, "the config"
    else:
        raise ConfigError(f"{where}: expected a mindformers run config with a model.model_config mapping (or a "
                          f"PanguAlphaConfig), found {type(d).__name__}{' keys ' + str(sorted(d)[:8]) if isinstance(d, dict) else ''}")
    kind = mc.get("type", "PanguAlphaConfig")
    if kind != "PanguAlphaConfig":
        raise ConfigError(f"{where}: {at}.type: expected PanguAlphaConfig, found {str(kind)[:40]!r}")
    act = mc.get("hidden_act", "fast_gelu")
    if not isinstance(act, str) or act not in MINDFORMERS_ACTIVATIONS:
        raise ConfigError(f"{where}: {at}.hidden_act: expected one of {sorted(MINDFORMERS_ACTIVATIONS)}, "
                          f"found {str(act)[:40]!r}")
    for key in ("post_layernorm_residual", "use_moe"):
        if mc.get(key, False) is not False:
            raise ConfigError(f"{where}: {at}.{key}: expected false (pangu-fn computes pre-LayerNorm dense "
                              f"PanGu-α), found {str(mc[key])[:40]!r}")

    def get(key: str, default: Any, kind: str) -> Any:
        v = mc.get(key, default)
        ok = {"size": type(v) is int and v > 0, "id": v is None or (type(v) is int and v >= 0),
              "float": type(v) in (int, float) and 0 < v < 1}[kind]
        if not ok:
            expected = {"size": "a positive integer", "id": "a token id or null", "float": "a number in (0, 1)"}[kind]
            raise ConfigError(f"{where}: {at}.{key}: expected {expected}, found {str(v)[:40]!r}")
        return v

    h, heads, layers = get("hidden_size", 2560, "size"), get("num_heads", 32, "size"), get("num_layers", 32, "size")
    if h % heads:
        raise ConfigError(f"{where}: {at}.num_heads: expected a divisor of hidden_size {h}, found {heads}")
    if layers < 2:
        raise ConfigError(f"{where}: {at}.num_layers: expected at least 2 (it counts the query layer), found {layers}")
    return ModelConfig(family="alpha", vocab_size=get("vocab_size", 40000, "size"), hidden_size=h,
                       num_layers=layers - 1, num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
                       intermediate_size=get("ffn_hidden_size", 4 * h, "size"),
                       max_seq_len=get("seq_length", 1024, "size"),
                       norm_eps=float(get("layernorm_epsilon", 1e-5, "float")),
                       activation=MINDFORMERS_ACTIVATIONS[act], query_layer=True, tie_embeddings=True,
                       eos_token_id=get("eos_token_id", 8, "id"), pad_token_id=get("pad_token_id", 6, "id"),
                       source_layout="mindformers")


# -- Hugging Face gpt_pangu port ------------------------------------------------------------------

def is_gpt_pangu(d: Mapping[str, Any]) -> bool:
    return d.get("model_type") == "gpt_pangu"


def gpt_pangu_config(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a gpt_pangu `config.json` (its `num_layers` counts the query layer)."""
    try:
        h, heads, layers = int(d["hidden_size"]), int(d["num_heads"]), int(d["num_layers"]) - 1
        act = d.get("activation_function", "gelu")
        if act not in GELU_NAMES:
            raise ConfigError(f"gpt_pangu config: activation_function {act!r}; expected one of {sorted(GELU_NAMES)}")
        return ModelConfig(family="alpha", vocab_size=int(d["vocab_size"]), hidden_size=h, num_layers=layers,
                           num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
                           intermediate_size=int(d.get("intermediate_size") or 4 * h),
                           max_seq_len=int(d.get("max_position_embeddings", 1024)),
                           norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), activation=GELU_NAMES[act],
                           query_layer=True, tie_embeddings=True, bos_token_id=d.get("bos_token_id"),
                           eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
                           source_layout="gpt_pangu")
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"gpt_pangu config: expected hidden_size, num_heads, num_layers, vocab_size; {e!r}") from None


def gpt_pangu_table(layers: int) -> dict[str, tuple[str, bool]]:
    top = {"tok_embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
           "query_embed.weight": "transformer.wqe.weight", "final_norm.weight": "transformer.ln_f.weight",
           "final_norm.bias": "transformer.ln_f.bias"}
    return _table(layers, HF_BLOCK, "transformer.h.", f"transformer.h.{layers}.", top)


def open_gpt_pangu(folder: Path, d: Mapping[str, Any], hint: ModelConfig | None = None) -> Source:
    """A gpt_pangu folder (`config.json` + `.bin` or `.safetensors`, sharded or not). The
    stored `lm_head.weight` is dropped when it equals `transformer.wte.weight` (tied)."""
    files = WeightFiles(folder)
    refs = {n: files.ref(n) for n in files.keys()}  # noqa: SIM118  (keys() only, not a mapping)
    base = hint or gpt_pangu_config(d)
    layers = _count_blocks(list(refs), "transformer.h.") - 1
    if layers < 1:
        raise FormatError(f"{folder}: expected transformer.h.0 ... and a query layer, found {layers + 1} blocks")
    skipped = []
    head = refs.pop("lm_head.weight", None)
    flat, ignored = _resolve(gpt_pangu_table(layers), refs, str(folder), HF_BUFFERS, HF_ALIASES)
    if head is not None:
        if head.shape == flat["tok_embed.weight"].shape and torch.equal(head.read(), flat["tok_embed.weight"].read()):
            skipped.append("lm_head.weight (a copy of transformer.wte.weight)")
        else:
            flat["lm_head.weight"] = head
    cfg = config_from_shapes("alpha", {k: r.shape for k, r in flat.items()}, base, KNOWN_HEADS, str(folder))
    return Source(folder, "gpt_pangu", cfg.replace(source_layout="gpt_pangu"), flat, skipped=skipped + ignored,
                  folder=folder)


def gpt_pangu_plan(cfg: ModelConfig) -> dict[str, str]:
    """HF gpt_pangu name -> our flat name (the head is written as a copy of the embedding)."""
    if cfg.family != "alpha":
        raise ConfigError(f"the gpt_pangu writer writes PanGu-α (family 'alpha'); this model is {cfg.family!r}")
    plan = {stored: ours for ours, (stored, _) in gpt_pangu_table(cfg.num_layers).items()}
    plan["lm_head.weight"] = "tok_embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    return plan


def gpt_pangu_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "fast_gelu": "quick_gelu"}.get(cfg.activation)
    if act is None or cfg.norm != "layernorm" or cfg.num_kv_heads != cfg.num_heads:
        raise ConfigError(f"gpt_pangu layout needs LayerNorm, GELU and MHA; found {cfg.norm}, {cfg.activation}, "
                          f"{cfg.num_heads}/{cfg.num_kv_heads} heads")
    return {"model_type": "gpt_pangu", "architectures": ["GPTPanguForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers + 1,
            "num_heads": cfg.num_heads, "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": True, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0,
            "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


# -- Megatron GPU port -------------------------------------------------------------------------------

def is_megatron(names: list[str]) -> bool:
    return any("language_model.transformer.topQueryLayer." in n for n in names)


def megatron_table(layers: int) -> dict[str, tuple[str, bool]]:
    """Our flat name -> (name under `model.language_model.`, False) of the Megatron port."""
    top = {"tok_embed.weight": "embedding.word_embeddings.weight",
           "pos_embed.weight": "embedding.position_embeddings.weight",
           "query_embed.weight": "topQueryEmbedding.top_query_embeddings.weight",
           "final_norm.weight": "transformer.final_layernorm.weight",
           "final_norm.bias": "transformer.final_layernorm.bias"}
    return _table(layers, MEGATRON_BLOCK, "transformer.layers.", "transformer.topQueryLayer.", top)


def megatron_source(path: Path, tensors: dict[str, torch.Tensor], skipped: list[str],
                    hint: ModelConfig | None = None) -> Source:
    """PanGu-Alpha-GPU (Megatron) state dict, flattened: names under `...language_model.`."""
    refs = {}
    for name, t in tensors.items():
        if "language_model." not in name:
            skipped.append(name)
            continue
        refs[name.split("language_model.", 1)[1]] = TensorRef.of(t)
    layers = _count_blocks(list(refs), "transformer.layers.")
    flat, _ = _resolve(megatron_table(layers), refs, str(path))
    cfg = config_from_shapes("alpha", {k: r.shape for k, r in flat.items()}, hint, KNOWN_HEADS, str(path))
    note = (f"activation {cfg.activation} " + ("from the config given" if hint is not None else
            "assumed (the released weights'): the port's .pt stores none; pass --config if it was trained with another"))
    return Source(path, "megatron", cfg.replace(source_layout="megatron"), flat, skipped=skipped, folder=path.parent,
                  notes=[note])


def megatron_state(cfg: ModelConfig, flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Our flat tensors as the port's `model_optim_rng.pt` object: `{"model": {"language_model":
    {"embedding": ..., "topQueryEmbedding": ..., "transformer": {flat names}}}}` (no `args`,
    so it loads with `weights_only=True`). Raises ConfigError for other families or an untied head."""
    if cfg.family != "alpha":
        raise ConfigError(f"the Megatron writer writes PanGu-α (family 'alpha'); this model is {cfg.family!r}")
    if "lm_head.weight" in flat:
        raise ConfigError("the PanGu-α Megatron layout has a tied head; this model stores lm_head.weight")
    lm: dict[str, Any] = {}
    for ours, (stored, _) in megatron_table(cfg.num_layers).items():
        group, rest = stored.split(".", 1)
        node = lm.setdefault(group, {})
        if group != "transformer":  # embedding modules nest one dict per module
            module, rest = rest.split(".", 1)
            node = node.setdefault(module, {})
        node[rest] = flat[ours]
    return {"model": {"language_model": lm}, "checkpoint_version": 3.0}
