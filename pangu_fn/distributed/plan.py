"""Which part of each parameter a rank holds: the Megatron-style sharding rules as data.

`split_plan(shapes, cfg, rank, world)` maps every flat parameter name to a `Split`:

| parameter | split |
|---|---|
| attn.q, mlp.gate, mlp.up (weight, bias) | column: the rank's query heads / FFN neurons (rows) |
| attn.k, attn.v (weight, bias) | column: KV heads / world when they divide, else the KV heads the rank's query heads read |
| attn.o, mlp.down (weight) | row: the same heads / neurons (columns); the bias is replicated and added once |
| tok_embed, lm_head (weight) | vocab: rows `rank * ceil(V / world)` on, zero-padded to `ceil(V / world)` |
| norms, pos_embed, query_embed, row-parallel biases | replicated |

Shapes are the truth: each block's head counts and FFN width come from its own weights, so
pruned trees shard too. The plan needs only names and shapes, so the same rules drive `shard`
(a tree in memory) and `load_shard` (slices read from a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import ConfigError

Range = tuple[int, int]


@dataclass(frozen=True)
class Split:
    """How a rank's part of one parameter is cut: `how` is replicate | column | row | vocab;
    `ranges` (half-open, along `dim`) are concatenated in order; `pad` zero rows follow."""

    how: str = "replicate"
    ranges: tuple[Range, ...] = ()
    pad: int = 0

    @property
    def dim(self) -> int:
        return 1 if self.how == "row" else 0


REPLICATE = Split()


def block_prefixes(cfg: ModelConfig) -> list[str]:
    return [f"blocks.{i}" for i in range(cfg.num_layers)] + (["query_layer"] if cfg.query_layer else [])


def kv_heads_for(heads: int, kv_heads: int, rank: int, world: int) -> list[int]:
    """The KV heads rank `rank` holds, in its local order. When `world` divides the KV heads,
    its contiguous share; otherwise the KV heads its query heads read (query head h reads
    KV head h // (heads / kv_heads)), each once if its query heads read them in equal runs,
    else one per query head (openPangu-1B at TP 4: 3 query heads over KV heads 0, 0, 1)."""
    if kv_heads % world == 0:
        n = kv_heads // world
        return list(range(rank * n, (rank + 1) * n))
    group, n = heads // kv_heads, heads // world
    needed = [h // group for h in range(rank * n, (rank + 1) * n)]
    distinct = sorted(set(needed))
    runs = len(needed) // len(distinct)
    return distinct if needed == [k for k in distinct for _ in range(runs)] else needed


def head_ranges(heads: list[int], head_dim: int) -> tuple[Range, ...]:
    """Row ranges of the given heads, consecutive heads merged."""
    out: list[list[int]] = []
    for h in heads:
        if out and out[-1][1] == h * head_dim:
            out[-1][1] += head_dim
        else:
            out.append([h * head_dim, (h + 1) * head_dim])
    return tuple((a, b) for a, b in out)


def valid_world_sizes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> list[int]:
    """Every world size that splits each block's query heads and FFN width evenly."""
    sizes = [_block_sizes(shapes, cfg, p) for p in block_prefixes(cfg)]
    top = min(min(h, f) for h, _, f in sizes)
    return [n for n in range(1, top + 1) if all(h % n == 0 and f % n == 0 for h, _, f in sizes)]


def check_world(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, world: int) -> None:
    """Raise ConfigError unless `world` splits every block evenly (naming the valid sizes)."""
    if not isinstance(world, int) or world < 1:
        raise ConfigError(f"tensor parallelism: expected a world size >= 1, found {world!r}")
    for p in block_prefixes(cfg):
        heads, _, ffn = _block_sizes(shapes, cfg, p)
        if heads % world or ffn % world:
            raise ConfigError(f"tensor parallelism over {world} ranks: {p} has {heads} query heads and FFN width "
                              f"{ffn}, which must both divide by the world size; valid sizes: "
                              f"{valid_world_sizes(shapes, cfg)}")


def split_plan(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, rank: int, world: int) -> dict[str, Split]:
    """{flat name: Split} for rank `rank` of `world` over a tree with these (logical) shapes.
    Names the plan does not list are replicated. Raises ConfigError for a world size that does
    not split every block's query heads and FFN width, a bad rank, or a fused tree."""
    check_world(shapes, cfg, world)
    if not 0 <= rank < world:
        raise ConfigError(f"tensor parallelism: expected a rank in [0, {world}), found {rank!r}")
    d, plan = cfg.head_dim, {}
    for p in block_prefixes(cfg):
        heads, kv_heads, ffn = _block_sizes(shapes, cfg, p)
        n = heads // world
        q = head_ranges(list(range(rank * n, (rank + 1) * n)), d)
        kv = head_ranges(kv_heads_for(heads, kv_heads, rank, world), d)
        f = ffn // world
        neurons = ((rank * f, (rank + 1) * f),)
        columns = {"attn.q": q, "attn.k": kv, "attn.v": kv, "mlp.gate": neurons, "mlp.up": neurons}
        for linear, ranges in columns.items():
            for part in ("weight", "bias"):
                plan[f"{p}.{linear}.{part}"] = Split("column", ranges)
        plan[f"{p}.attn.o.weight"] = Split("row", q)
        plan[f"{p}.mlp.down.weight"] = Split("row", neurons)
    v = cfg.vocab_size
    per = -(-v // world)
    lo, hi = min(rank * per, v), min((rank + 1) * per, v)
    for name in ("tok_embed.weight", "lm_head.weight"):
        plan[name] = Split("vocab", ((lo, hi),), per - (hi - lo))
    return {name: split for name, split in plan.items() if name in shapes}


def _block_sizes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, prefix: str) -> tuple[int, int, int]:
    """(query heads, KV heads, FFN width) of one block, from its shapes."""
    if f"{prefix}.attn.qkv.weight" in shapes or f"{prefix}.mlp.gate_up.weight" in shapes:
        raise ConfigError(f"tensor parallelism: {prefix} holds fused projections; shard the unfused tree "
                          "(fuse_projections is a decode layout for one process)")
    try:
        q, k, up = (shapes[f"{prefix}.{n}.weight"] for n in ("attn.q", "attn.k", "mlp.up"))
    except KeyError as e:
        raise ConfigError(f"tensor parallelism: expected {e.args[0]} in the tree, found none") from None
    return q[0] // cfg.head_dim, k[0] // cfg.head_dim, up[0]
