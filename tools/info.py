"""`pangu info MODEL`: family, sizes, parameter count, bytes by dtype."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model folder or preset")
    p.add_argument("model", help="model folder or preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def describe(params: object, cfg: object) -> dict:
    """The facts `pangu info` prints, as a dict."""
    from pangu_fn.params import layer_sizes
    from pangu_fn.tree import bytes_by_dtype, count_params, nbytes

    blocks = params["blocks"]
    widths = [layer_sizes(b, cfg) for b in blocks]
    return {
        "family": cfg.family,
        "config": cfg.to_dict(),
        "parameters": count_params(params),
        "bytes": nbytes(params),
        "bytes_by_dtype": bytes_by_dtype(params),
        "layers": [{"heads": w.num_heads, "kv_heads": w.num_kv_heads, "ffn": w.intermediate_size} for w in widths],
    }


def run(args: argparse.Namespace) -> int:
    from .common import resolve_model, write_json

    # a preset is described from shapes alone (meta tensors), so even pangu-7b costs nothing
    params, cfg, random = resolve_model(args.model, "cpu", meta=True)
    info = describe(params, cfg)
    if args.json:
        write_json(info, None)
        return 0
    c = cfg
    print(f"{args.model}: {c.family} family{' (preset, random weights)' if random else ''}")
    print(f"  layers {c.num_layers}{' + query layer' if c.query_layer else ''}, hidden {c.hidden_size}, "
          f"heads {c.num_heads} (kv {c.num_kv_heads}, head_dim {c.head_dim}), ffn {c.intermediate_size}")
    print(f"  vocab {c.vocab_size}, context {c.max_seq_len}, {c.norm}, {c.mlp}/{c.activation}, "
          f"{c.positions} positions{f' (theta {c.rope_theta:g})' if c.positions == 'rope' else ''}, "
          f"{'tied' if c.tie_embeddings else 'untied'} head")
    print(f"  parameters {info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)")
    for dtype, n in info["bytes_by_dtype"].items():
        print(f"  {dtype}: {n / 2**20:.1f} MiB")
    as_config = {"heads": c.num_heads, "kv_heads": c.num_kv_heads, "ffn": c.intermediate_size}
    if any(w != as_config for w in info["layers"]):  # structurally pruned: the shapes are the truth
        print("  per-layer widths (heads/kv heads/ffn, pruned): "
              + ", ".join(f"{w['heads']}/{w['kv_heads']}/{w['ffn']}" for w in info["layers"]))
    return 0

