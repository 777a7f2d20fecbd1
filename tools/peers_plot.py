"""`python -m pangu_tools.peers_plot JSON [JSON ...] --out PNG`: the decode speeds of
`pangu bench --peers` runs as one bar chart, each (model, scheme) group relative to llama.cpp's
row of that run (ratios within one run are what count; see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pangu_fn.errors import InputError

from .common import save_png

ENGINES = ("pangu-fn", "llama.cpp", "onnxruntime")


def groups(paths: list[Path]) -> list[tuple[str, dict[str, float]]]:
    """[(label "model scheme", {engine: tok/s relative to llama.cpp})] for every scheme of the
    runs with a llama.cpp row. Raises InputError for a file that is not a peers run."""
    out = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
            rows = [r for r in run["results"] if "peers_scheme" in r]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: expected the JSON of `pangu bench --peers`: {e}") from None
        for scheme in dict.fromkeys(r["peers_scheme"] for r in rows):
            speed = {r["engine"]: float(r["decode_tok_s"]) for r in rows if r["peers_scheme"] == scheme}
            if speed.get("llama.cpp"):
                out.append((f"{run.get('model', path.stem)}\n{scheme}",
                            {e: speed[e] / speed["llama.cpp"] for e in ENGINES if e in speed}))
    if not out:
        raise InputError(f"no peers run with a llama.cpp row in {[str(p) for p in paths]}")
    return out


def plot(data: list[tuple[str, dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(data) + 2.5, 4.2), dpi=120)
    width = 0.8 / len(ENGINES)
    for i, engine in enumerate(ENGINES):
        xs = [g + (i - 1) * width for g, (_, speed) in enumerate(data) if engine in speed]
        ys = [speed[engine] for _, speed in data if engine in speed]
        bars = ax.bar(xs, ys, width, label=engine)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(data)), [label for label, _ in data], fontsize=8)
    ax.set_ylabel("decode tok/s relative to llama.cpp")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pangu_tools.peers_plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by `pangu bench --peers --json`")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="batch-1 decode, each engine in its own process")
    args = parser.parse_args(argv)
    plot(groups(args.runs), args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
