"""`pangu run BUNDLE --prompt TEXT | --prompt-ids IDS`: the `pangu-run` command of the
pangu-runtime distribution (`pangu_runtime.cli`), as a subcommand of `pangu`. This module
imports neither torch nor pangu_fn."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pangu_runtime.cli import add_arguments, run

    p = sub.add_parser("run", help="generate with an exported bundle (ONNX Runtime, no torch)")
    add_arguments(p)
    p.set_defaults(func=run)
