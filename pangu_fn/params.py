"""Parameter trees: deterministic initialisation and validation against a config.

Tree layout (every linear is `{"weight": [out, in], "bias": [out]}`; `bias` only when the
family has one):

    tok_embed.weight [V, H]          pos_embed.weight [S, H] (learned positions)
    query_embed.weight [S, H]        (PanGu-α)
    blocks[i].attn_norm.{weight, bias}        blocks[i].mlp_norm.{weight, bias}
    blocks[i].attn.{q, k, v}.weight [heads_i * D, H]   blocks[i].attn.o.weight [H, heads_i * D]
    blocks[i].mlp.{gate, up}.weight [F_i, H]           blocks[i].mlp.down.weight [H, F_i]
    final_norm.{weight, bias}        query_layer (PanGu-α: one more block)
    lm_head.weight [V, H]            (untied models only)

`fuse_projections` makes a decode-time variant: `attn.qkv` in place of q, k, v and
`mlp.gate_up` in place of gate, up (rows stacked in that order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from .config import ModelConfig
from .errors import ConfigError, ShapeError
from .tree import leaves_with_names, map_with_names

Params = dict[str, Any]


@dataclass(frozen=True)
class LayerSizes:
    """Widths of one block, read from its parameter shapes."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def layer_sizes(block: Params, cfg: ModelConfig) -> LayerSizes:
    """Per-layer widths from shapes (shapes are the truth: pruned layers may differ)."""
    attn, mlp = block["attn"], block["mlp"]
    if "qkv" in attn:  # fused: q has cfg.num_heads heads (fuse_projections' rule), k and v the rest
        heads = cfg.num_heads
        kv_heads = (attn["qkv"]["weight"].shape[0] // cfg.head_dim - heads) // 2
    else:
        heads, kv_heads = attn["q"]["weight"].shape[0] // cfg.head_dim, attn["k"]["weight"].shape[0] // cfg.head_dim
    ffn = mlp["gate_up"]["weight"].shape[0] // 2 if "gate_up" in mlp else mlp["up"]["weight"].shape[0]
    return LayerSizes(num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn)


def init_params(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Params:
    """Random parameters, identical for the same `(cfg, seed)` on every machine.

    Weights ~ N(0, 0.02) (output projections scaled by 1/sqrt(2 * blocks), as GPT-2 does),
    biases 0, norm weights 1. Drawn in fp32 on the CPU, then cast and moved; on the "meta"
    device only shapes are made."""
    gen = torch.Generator().manual_seed(seed)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.num_blocks)

    def normal(*shape: int, s: float = std) -> torch.Tensor:
        if torch.device(device or "cpu").type == "meta":  # shapes only, no memory
            return torch.empty(*shape, dtype=dtype, device="meta")
        return (torch.randn(*shape, generator=gen) * s).to(dtype=dtype, device=device)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, device=device)

    def linear(n_out: int, n_in: int, bias: bool, s: float = std) -> Params:
        p = {"weight": normal(n_out, n_in, s=s)}
        if bias:
            p["bias"] = zeros(n_out)
        return p

    def norm() -> Params:
        p = {"weight": torch.ones(cfg.hidden_size, dtype=dtype, device=device)}
        if cfg.norm == "layernorm":
            p["bias"] = zeros(cfg.hidden_size)
        return p

    h, d = cfg.hidden_size, cfg.head_dim

    def block() -> Params:
        mlp = {"up": linear(cfg.intermediate_size, h, cfg.mlp_bias),
               "down": linear(h, cfg.intermediate_size, cfg.mlp_bias, out_std)}
        if cfg.mlp == "swiglu":
            mlp = {"gate": linear(cfg.intermediate_size, h, cfg.mlp_bias), **mlp}
        return {
            "attn_norm": norm(),
            "attn": {"q": linear(cfg.num_heads * d, h, cfg.attn_bias),
                     "k": linear(cfg.num_kv_heads * d, h, cfg.attn_bias),
                     "v": linear(cfg.num_kv_heads * d, h, cfg.attn_bias),
                     "o": linear(h, cfg.num_heads * d, cfg.attn_bias, out_std)},
            "mlp_norm": norm(),
            "mlp": mlp,
        }

    params: Params = {"tok_embed": {"weight": normal(cfg.vocab_size, h)}}
    if cfg.positions == "learned":
        params["pos_embed"] = {"weight": normal(cfg.max_seq_len, h)}
    if cfg.query_layer:
        params["query_embed"] = {"weight": normal(cfg.max_seq_len, h)}
    params["blocks"] = [block() for _ in range(cfg.num_layers)]
    params["final_norm"] = norm()
    if cfg.query_layer:
        params["query_layer"] = block()
    if not cfg.tie_embeddings:
        params["lm_head"] = {"weight": normal(cfg.vocab_size, h)}
    return decode_layout(params)


def expected_shapes(cfg: ModelConfig, params: Params) -> dict[str, tuple[int, ...]]:
    """The shape every leaf must have, given the config and each block's own widths."""
    h, d, v, s = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.max_seq_len
    out: dict[str, tuple[int, ...]] = {"tok_embed.weight": (v, h)}
    if cfg.positions == "learned":
        out["pos_embed.weight"] = (s, h)
    if cfg.query_layer:
        out["query_embed.weight"] = (s, h)

    def norm(prefix: str) -> None:
        out[f"{prefix}.weight"] = (h,)
        if cfg.norm == "layernorm":
            out[f"{prefix}.bias"] = (h,)

    def linear(prefix: str, n_out: int, n_in: int, bias: bool) -> None:
        out[f"{prefix}.weight"] = (n_out, n_in)
        if bias:
            out[f"{prefix}.bias"] = (n_out,)

    def block(prefix: str, blk: Any) -> None:
        try:
            sizes = layer_sizes(blk, cfg)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ShapeError(f"{prefix}: expected attn.q/k and mlp.up weights (tensors or quantized leaves), "
                             f"found {type(e).__name__}: {e}") from None
        q, kv, f = sizes.num_heads * d, sizes.num_kv_heads * d, sizes.intermediate_size
        norm(f"{prefix}.attn_norm")
        linear(f"{prefix}.attn.q", q, h, cfg.attn_bias)
        linear(f"{prefix}.attn.k", kv, h, cfg.attn_bias)
        linear(f"{prefix}.attn.v", kv, h, cfg.attn_bias)
        linear(f"{prefix}.attn.o", h, q, cfg.attn_bias)
        norm(f"{prefix}.mlp_norm")
        if cfg.mlp == "swiglu":
            linear(f"{prefix}.mlp.gate", f, h, cfg.mlp_bias)
        linear(f"{prefix}.mlp.up", f, h, cfg.mlp_bias)
        linear(f"{prefix}.mlp.down", h, f, cfg.mlp_bias)

    blocks = params.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != cfg.num_layers:
        found = len(blocks) if isinstance(blocks, list) else type(blocks).__name__
        raise ShapeError(f"params.blocks: expected a list of {cfg.num_layers} blocks, found {found}")
    for i, blk in enumerate(blocks):
        block(f"blocks.{i}", blk)
    norm("final_norm")
    if cfg.query_layer:
        block("query_layer", params.get("query_layer", {}))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def validate(params: Params, cfg: ModelConfig) -> None:
    """Check every tensor's presence and shape; raise ShapeError naming the tensor and both
    shapes. Also checks that each layer's query heads are a multiple of its KV heads."""
    want = expected_shapes(cfg, params)
    have = {name: tuple(leaf.shape) for name, leaf in leaves_with_names(params)}
    missing = [n for n in want if n not in have]
    if missing:
        raise ShapeError(f"params: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = [n for n in have if n not in want]
    if extra:
        raise ShapeError(f"params: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, shape in want.items():
        if have[name] != shape:
            raise ShapeError(f"params: tensor {name} has shape {list(have[name])}, "
                             f"expected {list(shape)} from the config")
        if name.endswith("attn.q.weight") and shape[0] % cfg.head_dim:
            raise ShapeError(f"params: tensor {name} rows {shape[0]} not a multiple of head_dim {cfg.head_dim}")
    for i, blk in enumerate(params["blocks"] + ([params["query_layer"]] if cfg.query_layer else [])):
        sizes = layer_sizes(blk, cfg)
        if sizes.num_kv_heads == 0 or sizes.num_heads % sizes.num_kv_heads:
            raise ShapeError(f"params: block {i} has {sizes.num_heads} query heads and "
                             f"{sizes.num_kv_heads} KV heads; expected a whole number of query heads per KV head")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" (or their long names, or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def astype(params: Params, dtype: str | torch.dtype) -> Params:
    """A new tree with every floating-point tensor cast to `dtype` (the compute dtype) and laid
    out for that dtype (see `decode_layout`); quantized leaves keep their packed data and move
    their compute dtype via `.astype`."""
    dtype = parse_dtype(dtype)

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.to(dtype) if leaf.is_floating_point() else leaf
        return leaf.astype(dtype)

    return decode_layout(pytree.tree_map(cast, params))


def to_device(params: Params, device: str | torch.device) -> Params:
    """A new tree with every leaf on `device` (laid out as `decode_layout` says for it)."""
    return decode_layout(pytree.tree_map(lambda leaf: leaf.to(device), params))


def decode_layout(params: Params) -> Params:
    """The memory layout batch-1 decoding reads fastest, without changing any shape or value.

    On the CPU, MKL's matrix-vector product runs 1.2x (blocks) to 2x (a 50k-row LM head)
    faster on fp32 weights stored column-major (a transposed view: logical shape [out, in],
    strides (1, out)) than row-major: they stream like `x @ W_t`. Where the native fp32 kernel
    runs (`native.f32_kernels()`, x86-64 with AVX2), it streams row-major weights faster still,
    so they stay row-major (`column_major_fp32`). Other dtypes and devices keep row-major. Applies to the linear weights of the blocks, the LM head, and a tied embedding
    (which is the head); `pos_embed` and untied embeddings are only gathered and stay as they are.
    Returns a new tree; leaves already in the right layout are shared, not copied."""

    tied = "lm_head" not in params
    return map_with_names(lambda name, leaf: laid_out(name, leaf, tied), params)


def laid_out(name: str, leaf: Any, tied: bool) -> Any:
    """The leaf named `name` (dotted) in `decode_layout`'s layout; `tied`: the tree has no
    `lm_head`, so `tok_embed.weight` is the head; other tensors are made contiguous. One copy at
    most (none when already laid out)."""
    if not isinstance(leaf, torch.Tensor):
        return leaf
    if leaf.dim() != 2 or not is_matmul_weight(name, tied):
        return leaf.contiguous()
    if leaf.device.type == "cpu" and leaf.dtype == torch.float32 and column_major_fp32():
        return leaf if leaf.t().is_contiguous() else leaf.t().contiguous().t()
    return leaf.contiguous()


def column_major_fp32() -> bool:
    """Whether `decode_layout` stores fp32 CPU matmul weights column-major (where the native
    fp32 kernel does not run; see `decode_layout`)."""
    from . import native

    return not native.f32_kernels()


def is_matmul_weight(name: str, tied: bool) -> bool:
    """True for the leaves `decode_layout` lays out: block (and query layer) weights and the
    LM head (`tok_embed.weight` when `tied`, the tree having no `lm_head`)."""
    return name == "lm_head.weight" or (name == "tok_embed.weight" and tied) or name.startswith(
        ("blocks.", "query_layer."))


def fuse_projections(params: Params, cfg: ModelConfig) -> Params:
    """The same model with fewer, wider products: each block's q, k, v as one linear `attn.qkv`
    and (SwiGLU) gate, up as one `mlp.gate_up`. Where per-call overhead dominates (small models
    decoding a row at a time) this is 15-20% faster. A decode layout for eager use only:
    quantize, prune, save and export expect the unfused tree. Blocks with pruned query heads
    and PanGu-α's query layer (its queries come from another input) stay unfused; fused
    blocks stay as they are. Raises
    ConfigError for quantized leaves (fuse the float tree, then quantize it)."""
    if any(not isinstance(leaf, torch.Tensor) for _, leaf in leaves_with_names(params)):
        raise ConfigError("fuse_projections: expected a float tree, found quantized leaves; fuse before quantizing")

    def stack(parts: list[Params]) -> Params:
        fused = {"weight": torch.cat([p["weight"] for p in parts])}
        if "bias" in parts[0]:
            fused["bias"] = torch.cat([p["bias"] for p in parts])
        return fused

    def fuse(block: Params) -> Params:
        attn, mlp = dict(block["attn"]), dict(block["mlp"])
        if "q" in attn and attn["q"]["weight"].shape[0] == cfg.num_heads * cfg.head_dim:
            attn["qkv"] = stack([attn.pop("q"), attn.pop("k"), attn.pop("v")])
        if "gate" in mlp:
            mlp["gate_up"] = stack([mlp.pop("gate"), mlp.pop("up")])
        return {**block, "attn": attn, "mlp": mlp}

    return decode_layout({**params, "blocks": [fuse(b) for b in params["blocks"]]})
