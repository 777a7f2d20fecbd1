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
            "export", "run", "serve", "serve_bench", "serve_anchor"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with just `only` (a command's registration may import
    torch; `pangu run` must not)."""
    parser = argparse.ArgumentParser(prog="pangu", description="Run, compress and export Pangu models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else [only]:
        if importlib.util.find_spec(f"pangu_tools.{name}") is not None:
            importlib.import_module(f"pangu_tools.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a.replace("-", "_") for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # pangu_fn (and torch) is imported only by the commands that need it: `pangu run` stays torch-free
        errors = sys.modules.get("pangu_fn.errors")
        if errors is None or not isinstance(e, errors.PanguError):
            raise
        print(f"pangu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pangu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
