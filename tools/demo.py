"""`pangu demo`: the main job shown by `make demo`."""

from __future__ import annotations

import argparse
import tempfile
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo")
    p.add_argument("--preset", default="tiny-openpangu")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pangu_fn as pf

    cfg = pf.ModelConfig.preset(args.preset)
    print(f"pangu demo: preset {args.preset} with RANDOM weights (seed 0): the tokens below are "
          "noise, not language; a trained demo model replaces this.")
    params = pf.init_params(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = pf.save(f"{tmp}/model", params, cfg)
        params, cfg = pf.load(path)
        print(f"saved and reloaded {pf.count_params(params):,} parameters from {path.name}/")
    prompt = [1, 17, 42, 99, 7]
    start = time.perf_counter()
    stamps, tokens = [], []
    for ev in pf.stream(params, cfg, [prompt], args.max_new_tokens, eos_token_ids=()):
        stamps.append(time.perf_counter())
        tokens.append(ev.token)
    print(f"prompt ids: {prompt}")
    print(f"generated:  {tokens}")
    print(f"prefill {1e3 * (stamps[0] - start):.1f} ms, decode {(len(stamps) - 1) / (stamps[-1] - stamps[0]):.0f} tokens/s")
    return 0
