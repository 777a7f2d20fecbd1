"""Helpers shared by the commands: model resolution, prompts, devices, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_model_args(p: argparse.ArgumentParser, seed_help: str = "seed for a preset's random weights") -> None:
    p.add_argument("--model", required=True, help="model folder or preset name (random weights)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | npu | auto (default cpu)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored; fp32 for presets)")
    p.add_argument("--weights-seed", type=int, default=0, help=seed_help)


def resolve_model(spec: str, device: str = "cpu", dtype: str | None = None, seed: int = 0,
                  meta: bool = False) -> tuple[Any, Any, bool]:
    """(params, cfg, is_random) for a model folder or a preset name (random weights from
    `seed`, or shape-only meta tensors with `meta`). Raises ConfigError for neither."""
    import pangu_fn as pf
    from pangu_fn.errors import ConfigError

    dev = pf.select_device(device)
    if Path(spec).exists():
        params, cfg = pf.load(spec, device=dev, dtype=dtype)
        return params, cfg, False
    if spec in pf.PRESETS:
        cfg = pf.ModelConfig.preset(spec)
        from pangu_fn.params import parse_dtype

        params = pf.init_params(cfg, seed=seed, dtype=parse_dtype(dtype or "fp32"), device="meta" if meta else dev)
        return params, cfg, True
    raise ConfigError(f"--model {spec!r} is neither an existing folder nor a preset; presets: {sorted(pf.PRESETS)}")


def parse_prompt_ids(text: str) -> list[list[int]]:
    """"1 2 3" -> [[1, 2, 3]]; prompts separated by ';' or '|' give a batch."""
    from pangu_fn.errors import InputError

    prompts = []
    for part in text.replace("|", ";").split(";"):
        try:
            prompts.append([int(t) for t in part.replace(",", " ").split()])
        except ValueError:
            raise InputError(f"--prompt-ids: expected integers separated by spaces, found {part.strip()!r}") from None
    return prompts


def write_json(obj: Any, out: str | None) -> None:
    """Print JSON to stdout (`out` None or '-') or write it atomically to a file."""
    text = json.dumps(obj, indent=2)
    if out in (None, "-"):
        print(text)
        return
    from pangu_fn.io.atomic import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


def save_png(fig: Any, path: Path) -> None:
    """Lay out a matplotlib figure, write it to `path` as a PNG atomically (mode 0644), close it."""
    import matplotlib.pyplot as plt

    from pangu_fn.io.atomic import atomic_file

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
        tmp.chmod(0o644)
    plt.close(fig)


def tokenizer_for(spec: str) -> Any:
    """The tokenizer stored beside a model folder. Raises ConfigError when there is none."""
    from pangu_fn.errors import ConfigError
    from pangu_fn.tokenizer import find_tokenizer, load_tokenizer

    if not Path(spec).is_dir() or find_tokenizer(spec) is None:
        raise ConfigError(f"--prompt needs a tokenizer, and {spec!r} has none beside it; "
                          "pass token ids with --prompt-ids")
    return load_tokenizer(spec)


class TextStream:
    """Turns a growing list of token ids into the newly completed text, holding back an
    incomplete UTF-8 sequence (byte-fallback pieces) until its last byte arrives."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new
