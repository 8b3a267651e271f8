"""Pieces the command line shares between ``lowbit.cli`` and the commands implemented next to their
work (``lowbit.analysis.cli_analysis``, ``lowbit.analysis.mixed``): the model option group,
``--option KEY=VALUE`` parsing and the two-column table output.

Kept below ``lowbit.analysis`` and ``lowbit.cli`` so that neither imports the other for them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lowbit.errors import LowbitError
from lowbit.models.aliases import DEFAULT_MODEL


def print_table(rows: Sequence[tuple[str, Any]]) -> None:
    """Two aligned columns: name and value."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias, HF directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--cache", default=None, help="cache directory (default $LOWBIT_CACHE or ~/.cache/lowbit)")


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as a dict; each VALUE is read by the bounded YAML loader."""
    from lowbit.safeio import load_yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LowbitError(f"--option expects KEY=VALUE, got {pair!r}")
        if key in out:
            raise LowbitError(f"--option {key} is given twice; give each option once")
        out[key] = load_yaml(value, f"--option {key}")
    return out
