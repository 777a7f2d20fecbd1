"""Perplexity of a model pruned 10-50% by each method: a JSON file, a PNG plot and a Markdown table.

    python -m pangu_tools.prune_sweep --model models/demo/target --out docs

writes `OUT/pruning_sweep.json` and `OUT/pruning_sweep.png`, prints the table, and with
`--doc docs/pruning.md` replaces the table between `<!-- sweep:begin -->` and
`<!-- sweep:end -->` in that file. Every point is one `pangu_fn.prune` call on the same
weights; perplexity is measured on the held-out documents beside the model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from pangu_fn.io.atomic import atomic_file

from .common import save_png

BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


def series(levels: list[float], recovery_steps: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, kind, recipe fields) for every method of the sweep; kind is "unstructured" or "structured"."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for s in levels:
        structured = {"method": "structured", "heads": s, "ffn": s}
        out += [("magnitude (per layer)", "unstructured", {"method": "magnitude", "sparsity": s}),
                ("wanda (per row)", "unstructured", {"method": "wanda", "sparsity": s, "granularity": "row"}),
                ("structured, magnitude", "structured", structured),
                ("structured, activation", "structured", {**structured, "importance": "activation"}),
                ("structured, taylor", "structured", {**structured, "importance": "taylor"})]
        if recovery_steps:
            out.append((f"structured, taylor + {recovery_steps}-step recovery x2", "structured",
                        {**structured, "method": "iterative", "base": "structured", "importance": "taylor",
                         "rounds": 2, "recovery_steps": recovery_steps, "recovery_loss": "distill"}))
    out += [(f"{n}:{m} {score}", "n:m", {"method": "n:m", "n": n, "m": m, "score": score})
            for n, m in ((2, 4), (4, 8)) for score in ("magnitude", "wanda")]
    return out


def markdown(result: dict[str, Any]) -> str:
    """The sweep as a Markdown table: one row per method, one column per nominal level."""
    levels = result["levels"]
    rows: dict[str, dict[float, dict[str, Any]]] = {}
    for p in result["points"]:
        rows.setdefault(p["name"], {})[p["level"]] = p
    head = "| method | " + " | ".join(f"{lvl:.0%}" for lvl in levels) + " |"
    lines = [(f"Dense model: held-out perplexity **{result['dense_perplexity']:.3f}** "
             f"({result['eval_tokens']:,} tokens). Each cell: perplexity (fraction of the blocks' linear "
             "weights removed or zeroed)."), "", head, "|" + "---|" * (len(levels) + 1)]
    for name, points in rows.items():
        if any(p["kind"] == "n:m" for p in points.values()):
            continue
        cells = [f"{points[lvl]['perplexity']:.2f} ({points[lvl]['reduction']:.0%})" if lvl in points else "-"
                 for lvl in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    nm = [p for p in result["points"] if p["kind"] == "n:m"]
    if nm:
        lines += ["", "| semi-structured (50%) | perplexity |", "|---|---|"]
        lines += [f"| {p['name']} | {p['perplexity']:.2f} |" for p in nm]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p in result["points"]:
        if p["kind"] != "n:m":
            by_name.setdefault(p["name"], []).append(p)
    for name, pts in by_name.items():
        pts = sorted(pts, key=lambda p: p["reduction"])
        style = "--" if pts[0]["kind"] == "unstructured" else "-"
        xs = [0] + [p["reduction"] * 100 for p in pts]
        ax.plot(xs, [result["dense_perplexity"]] + [p["perplexity"] for p in pts],
                style, marker="o", ms=3.5, label=name)
    for p in result["points"]:
        if p["kind"] == "n:m":
            ax.scatter([p["reduction"] * 100], [p["perplexity"]], marker="x", s=30, label=p["name"])
    ax.axhline(result["dense_perplexity"], color="grey", lw=0.8, ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("blocks' linear weights removed or zeroed (%)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"Pruning {result['model']} ({result['parameters'] / 1e6:.1f}M parameters)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pangu_tools.prune_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/demo/target")
    parser.add_argument("--out", default="docs", help="folder for pruning_sweep.json and pruning_sweep.png")
    parser.add_argument("--doc", default=None, help="Markdown file whose sweep table to replace")
    parser.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--eval-text", default=None, help="default: heldout.jsonl beside the model")
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--calib", default="stdlib", help="as `pangu prune --calib`")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--recovery-steps", type=int, default=100, help="0 skips the recovery series")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    import pangu_fn as pf
    from pangu_fn.evaluate import perplexity
    from pangu_fn.prune import PruneRecipe, prune
    from pangu_fn.tokenizer import load_tokenizer

    from .prune import calibration_tokens, default_eval_file, read_text_tokens

    torch.set_num_threads(args.threads)
    params, cfg = pf.load(args.model, dtype="fp32")
    tokenizer = load_tokenizer(args.model)
    eval_file = args.eval_text or default_eval_file(args.model)
    if eval_file is None:
        raise pf.ConfigError(f"no held-out text beside {args.model}; pass --eval-text")
    eval_ids = read_text_tokens(eval_file, tokenizer)[: args.eval_tokens]
    calib = calibration_tokens(args.calib, args.model, cfg, tokenizer, seed=0)
    levels = [float(x) for x in args.levels.split(",")]
    start = time.time()
    dense = perplexity(params, cfg, eval_ids)
    points = []
    todo = series(levels, args.recovery_steps)
    for i, (name, kind, fields) in enumerate(todo, 1):
        recipe = PruneRecipe(**fields, calib_samples=args.calib_samples)
        pruned, report = prune(params, recipe, calib, cfg=cfg)
        ppl = perplexity(pruned, cfg, eval_ids)
        level = fields.get("sparsity", fields.get("heads", 0.5)) if kind != "n:m" else 0.5
        points.append({"name": name, "kind": kind, "level": level, "recipe": recipe.to_dict(), "perplexity": ppl,
                       "reduction": report.scope["reduction"], "parameters": report.parameters["after"]})
        print(f"[{i}/{len(todo)}] {name} {level:.0%}: perplexity {ppl:.3f} "
              f"(reduction {report.scope['reduction']:.1%}, {time.time() - start:.0f}s)", file=sys.stderr)
    result = {"model": args.model, "parameters": pf.count_params(params), "eval_file": str(eval_file),
              "eval_tokens": len(eval_ids), "calib": args.calib, "dense_perplexity": dense, "levels": levels,
              "python": platform.python_version(), "torch": torch.__version__,
              "seconds": round(time.time() - start, 1), "points": points}
    out = Path(args.out)
    with atomic_file(out / "pruning_sweep.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.chmod(0o644)
    plot(result, out / "pruning_sweep.png")
    table = markdown(result)
    print(table)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            raise pf.ConfigError(f"{doc}: expected the markers {BEGIN} and {END}")
        head, rest = text.split(BEGIN, 1)
        with atomic_file(doc) as tmp:
            tmp.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
            tmp.chmod(0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
