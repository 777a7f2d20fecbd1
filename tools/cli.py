"""`pangu` entry point: one subcommand per module in this package.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. Errors of pangu-fn (PanguError) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = ["generate", "info", "bench", "demo", "train_demo", "convert", "quantize", "prune",
            "export", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu", description="Run, compress and export Pangu models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if importlib.util.find_spec(f"pangu_tools.{name}") is not None:
            importlib.import_module(f"pangu_tools.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pangu_fn.errors import PanguError  # imported here so `pangu --help` stays light

    try:
        return int(args.func(args) or 0)
    except PanguError as e:
        print(f"pangu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pangu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
