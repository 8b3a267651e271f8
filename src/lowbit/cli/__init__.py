"""The ``lowbit`` command line: ``lowbit info|eval|quantize ...``.

One module per command (``info``, ``eval``, ``quantize`` for quantize and compress, ``finetune``, ``generate``,
``bench``, ``sweep``, ``export``, ``analysis`` for analyze and report), each with ``add_parser(sub)``
and the function its parser runs; the option groups they share are in ``lowbit.cli.options``.
The command line is the top layer: nothing else in lowbit imports it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lowbit.cli import analysis, bench, distill, export, finetune, generate, info, prune, quantize, sweep
from lowbit.cli import eval as eval_command
from lowbit.errors import LowbitError

COMMANDS = (info, eval_command, quantize, prune, distill, finetune, generate, bench, sweep, export, analysis)  # the order --help lists

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Compress LLMs and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
