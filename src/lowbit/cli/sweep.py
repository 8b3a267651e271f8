"""``lowbit sweep MODEL --methods ... --out DIR``: every method x bits x group size quantized and
evaluated on the same windows (``lowbit.analysis.sweep``); resumable."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lowbit.cli.options import add_calibration_options, add_device_option, add_eval_options, add_model_options
from lowbit.outputs import check_output


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="quantize + evaluate every method x bits x group size on the same data; resumable")
    add_model_options(p)
    p.add_argument("--methods", required=True, help="comma-separated weight methods, e.g. rtn,gptq,awq,hqq")
    p.add_argument("--bits", default="8,4,3,2", help="comma-separated bit widths (default 8,4,3,2)")
    p.add_argument("--group-sizes", default="64", help="comma-separated group sizes, 'channel' for per channel (default 64)")
    p.add_argument("--sparsities", default="0", help="comma-separated fractions pruned before quantizing (a sweep axis; "
                                                      "0: no pruning); --methods none: pruned only")
    p.add_argument("--pruner", default="sparsegpt", help="the sparsity axis' pruning step: magnitude, wanda or sparsegpt")
    p.add_argument("--out", required=True, help="results directory (sweep.json, sweep.md); re-running resumes")
    add_calibration_options(p)
    add_eval_options(p, split=False, data_dir=False, max_windows=10,
                     max_windows_help="evaluation windows (a fixed prefix of the test split)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes, or Ray tasks (extra 'ray')")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--workers", type=int, default=1, help="configurations run at once on this machine")
    p.add_argument("--threads", type=int, default=None, help="torch threads per configuration (default: cores / workers)")
    add_device_option(p, "where each configuration quantizes and evaluates (cpu, cuda, cuda:N)")
    p.add_argument("--redo", default=None, metavar="NAMES",
                   help="comma-separated configurations (e.g. awq-w4g64) or methods (awq) to run again though finished")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.analysis.executors import make_executor
    from lowbit.analysis.sweep import SweepData, expand, parse_group, parse_list, run_sweep

    configs = expand(parse_list(args.methods, "method"), parse_list(args.bits, "bits", int),
                     parse_list(args.group_sizes, "group size", parse_group),
                     parse_list(args.sparsities, "sparsity", float), args.pruner)
    check_output(args.out, "results", option="--out")
    data = SweepData(args.calib, args.nsamples, args.seqlen, args.seed, args.eval_dataset, args.eval_seqlen,
                     args.max_windows)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.workers, 1))
    executor = make_executor(args.executor, args.workers, args.ray_address, threads)
    redo = tuple(parse_list(args.redo, "redo")) if args.redo else ()
    sweep = run_sweep(args.model, configs, args.out, executor, data, args.cache, threads, device=args.device,
                      redo=redo)
    failed = [r["config"] for r in sweep["rows"] if r.get("status") != "ok"]
    print(f"wrote {args.out}/sweep.json and sweep.md ({len(sweep['rows'])} configurations"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")")
    return 0
