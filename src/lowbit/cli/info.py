"""``lowbit info MODEL``: architecture, parameter count, size on disk and bits per weight."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lowbit.cli.display import fmt_bytes, print_table
from lowbit.cli.options import add_json_option, add_model_options


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="architecture, parameter count, size on disk and bits per weight")
    add_model_options(p)
    add_json_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.models.info import model_info

    info = model_info(args.model, args.cache)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    print_table([
        ("model", info.ref),
        ("source", f"{info.kind} {info.path or ''}".strip()),
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("layers", info.layers),
        ("hidden size", info.hidden_size),
        ("heads (kv)", f"{info.attention_heads} ({info.kv_heads})"),
        ("vocab", info.vocab_size),
        ("context", info.context),
        ("parameters", f"{info.parameters:,}"),
        ("dtype", info.dtype),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info.tensor_types.items())),
        ("size on disk", fmt_bytes(info.size_on_disk)),
        ("bits per weight", f"{info.bits_per_weight:.3f}" if info.bits_per_weight else "n/a"),
    ])
    return 0
