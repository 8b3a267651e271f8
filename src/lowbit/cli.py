"""The ``lowbit`` command line: ``lowbit info|eval ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lowbit.errors import LowbitError
from lowbit.models.aliases import DEFAULT_MODEL


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def print_table(rows: Sequence[tuple[str, Any]]) -> None:
    """Two aligned columns: name and value."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"alias, HF directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--cache", default=None, help="cache directory (default $LOWBIT_CACHE or ~/.cache/lowbit)")


def cmd_info(args: argparse.Namespace) -> int:
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
        ("size on disk", _fmt_bytes(info.size_on_disk)),
        ("bits per weight", f"{info.bits_per_weight:.3f}" if info.bits_per_weight else "n/a"),
    ])
    return 0


def _eval_rows(r: Any) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("model", r.model),
        ("data", f"{r.dataset}/{r.split}, {r.windows} windows x {r.seqlen} = {r.tokens} tokens"),
        ("perplexity", f"{r.perplexity:.4f}"),
    ]
    if r.kl is not None:
        rows += [(f"KL vs {r.reference}", f"{r.kl:.5f} nats/token"), ("top-1 agreement", f"{100 * r.top1_agreement:.2f}%")]
    rows += [
        ("throughput", f"{r.tokens_per_s:.1f} tokens/s ({r.seconds:.1f} s)"),
        ("peak RSS", f"{r.peak_rss_mb:.0f} MiB"),
    ]
    if r.peak_device_mb is not None:
        rows.append(("peak device memory", f"{r.peak_device_mb:.0f} MiB"))
    rows.append(("device / dtype", f"{r.device} / {r.dtype}"))
    return rows


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, cache=args.cache,
                            trust_remote_code=args.trust_remote_code)
    reference = None
    if args.reference:
        reference, _ = load_model(args.reference, dtype=args.dtype, device=args.device, cache=args.cache,
                                  trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tok, args.dataset, args.split, args.seqlen, args.max_windows, reference,
                      progress=not args.json and sys.stderr.isatty(), data_dir=args.data_dir)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(_eval_rows(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Compress LLMs and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, parameter count, size on disk and bits per weight")
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity (GPTQ convention), KL/top-1 vs a reference, speed, memory")
    _add_model_options(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, ptb, c4 or a .txt/.jsonl path")
    p.add_argument("--split", default="test")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--reference", default=None, help="reference model for KL divergence and top-1 agreement")
    p.add_argument("--data-dir", default=None, help="local data directory (default $LOWBIT_DATA_DIR)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
