"""``lowbit quantize --streamed``: the block-at-a-time run (``lowbit.stream``), for models larger than memory."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowbit.cli.display import print_table
from lowbit.errors import LowbitError


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streamed", action="store_true",
                   help="never hold the whole model: read, compress, write and free one decoder block at a time "
                        "(needs --out; finished blocks are kept beside it until the output is complete)")
    p.add_argument("--resume", action="store_true",
                   help="with --streamed: continue an interrupted streamed run into the same --out")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="with --streamed: a memory budget (600MiB, 1.5GiB, 2GB); the calibration activations go to "
                        "disk when they do not fit beside one block, and a budget below one block's need is refused")


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.streamed or args.resume or args.max_memory is not None)


def check_args(args: argparse.Namespace) -> None:
    """What a streamed run cannot combine with, before any work."""
    from lowbit.stream.spill import parse_memory

    if args.resume and not args.streamed:
        raise LowbitError("--resume continues a streamed run: pass --streamed too")
    if args.max_memory is not None:
        if not args.streamed:
            raise LowbitError("--max-memory budgets a streamed run: pass --streamed too")
        args.max_memory_bytes = parse_memory(args.max_memory)
    if args.out is None:
        raise LowbitError("--streamed writes each finished block to --out as it goes: give --out DIR")
    clash = [flag for flag, on in (("--eval", args.eval), ("--target-bpw", args.target_bpw is not None),
                                   ("--target-mb", args.target_mb is not None), ("--device", args.device != "cpu"))
             if on]
    if clash:
        raise LowbitError(f"--streamed does not take {clash[0]} yet; evaluate the output afterwards "
                          "(lowbit eval OUT) or run without --streamed")


def run(args: argparse.Namespace, recipe: Any) -> int:
    """Calibrate on the model's tokenizer alone, then quantize block by block into ``args.out``."""
    from lowbit.cli.quantize import report_rows
    from lowbit.data import get_calibration
    from lowbit.models.loading import load_tokenizer, parse_dtype
    from lowbit.stream.run import quantize_streamed

    tok = load_tokenizer(args.model, args.cache)
    calib = get_calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed)
    report, written = quantize_streamed(args.model, recipe, calib, args.out, tok, fmt=args.format,
                                        batch_size=args.batch_size, resume=args.resume, overwrite=args.overwrite,
                                        progress=not args.json and sys.stderr.isatty(), dtype=parse_dtype(args.dtype),
                                        cache=args.cache, max_memory=getattr(args, "max_memory_bytes", None))
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"} | {"out": args.out}, indent=2))
    else:
        resumed = report.extra["streamed"]["resumed_at_block"]
        rows = report_rows(report, None, None, args.out) + [("format", written)]
        if resumed:
            rows.append(("resumed at block", resumed))
        print_table(rows)
    return 0
