"""``lowbit quantize`` and ``lowbit compress`` (the same command): one experiment job
(``lowbit.experiment``) built from the flags: calibrate, apply the recipe, evaluate, save."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from lowbit.cli import mixed_precision, streamed
from lowbit.cli.display import print_table
from lowbit.cli.launch import launch
from lowbit.cli.options import (
    add_calibration_options,
    add_eval_options,
    add_json_option,
    add_kv_cache_option,
    add_loading_options,
    add_model_options,
    add_overwrite_option,
    calibration,
    model_source,
    parse_options,
)
from lowbit.errors import LowbitError
from lowbit.experiment import Evaluation, Job, Output, run_job
from lowbit.export import FORMATS
from lowbit.outputs import check_output, input_paths

COMMANDS = {
    "quantize": "quantize a model with a recipe (or --method/--bits/--group-size)",
    "compress": "run any recipe of compression steps (staged: pruning, scaling, rounding ...); the same options as "
                "quantize",
}


def add_parser(sub: Any) -> None:
    for command, text in COMMANDS.items():
        p = sub.add_parser(command, help=text)
        _add_options(p)
        p.set_defaults(func=run)


def _add_options(p: argparse.ArgumentParser) -> None:
    """The options of one recipe run: model, recipe (or flags, or a mixed-precision target),
    calibration, evaluation, output."""
    add_model_options(p)
    p.add_argument("--recipe", default=None, help="shipped recipe name (e.g. gptq-w4g64) or a YAML file")
    p.add_argument("--method", default=None, help="method for a one-entry recipe (rtn, gptq, ...)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None, help="group size (default: per channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    p.add_argument("--activations", default=None, metavar="PRESET",
                   help="also quantize the layers' inputs (A8_TOKEN, A4_TOKEN, A8_TENSOR, FP8_E4M3_TOKEN ...)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-bpw", type=float, default=None, metavar="BPW",
                        help="mixed precision: pick each layer's format from --candidates by measured sensitivity so the "
                             "quantized linears average at most BPW bits per weight (scales/zeros included); "
                             "--method quantizes them (default gptq), --bits/--group-size are not used")
    target.add_argument("--target-mb", type=float, default=None, metavar="MB",
                        help="mixed precision with a size budget: MB (10^6 bytes) of the quantized linears")
    p.add_argument("--candidates", default="2:64,3:64,4:64,8", metavar="BITS[:GROUP],...",
                   help="formats --target-bpw/--target-mb choose from (no group: per channel; --asym applies)")
    p.add_argument("--sensitivity", default=None, metavar="DIR",
                   help="results directory: reuse its sensitivity.json (same model and candidates), else write it there")
    add_kv_cache_option(p, "KV-cache setting saved with the model and used by --eval after quantization (overrides "
                           "the recipe's)")
    add_run_options(p, "quantized")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="checkpoint format for --out (auto: compressed-tensors when every layer fits, else fake-quant)")
    streamed.add_options(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel calibration: run as N ranks on this machine (the windows split over them, "
                        "statistics summed, layers dealt out); torchrun --nproc-per-node N -m lowbit.cli quantize ... "
                        "does the same across machines")
    add_loading_options(p)
    add_json_option(p)


def add_run_options(p: argparse.ArgumentParser, what: str) -> None:
    """Calibration, ``--eval`` (before and after) with its windows, ``--out`` and ``--overwrite``: the options of a
    job that changes a model and may write it (quantize, prune)."""
    add_calibration_options(p, batch_size=8)
    p.add_argument("--eval", action="store_true", help="perplexity before and after")
    add_eval_options(p)
    p.add_argument("--out", default=None, help=f"write the {what} model + summary here (a new directory, or one "
                                               "lowbit wrote, which is replaced)")
    add_overwrite_option(p)


def run(args: argparse.Namespace) -> int:
    from lowbit.analysis.mixed import summary_rows
    from lowbit.data.windows import check_batch_size

    check_batch_size(args.batch_size, "--batch-size")
    mixed = mixed_precision.wanted(args)  # per-layer formats by sensitivity
    if streamed.wanted(args):
        streamed.check_args(args)
    check_outputs(args)
    ranks = _ranks(args)
    if ranks is None:
        _check_ranks_can_run(args, _recipe_from_args(args))  # refused once, before ranks start
        return launch(args.nproc, args.argv)
    if streamed.wanted(args):
        return streamed.run(args, _recipe_from_args(args))
    progress = not args.json and sys.stderr.isatty()
    if mixed:
        mixed_precision.check_args(args)
        recipe: Any = mixed_precision.recipe_builder(args, progress, _kv_option(args))
    else:
        recipe = _recipe_from_args(args)
    job = job_from_args(args, recipe, progress)
    if ranks.rank != 0:  # rank 0 evaluates, writes and reports
        run_job(dataclasses.replace(job, eval=None, out=None, progress=False))
        return 0
    result = run_job(job)
    report = result.report
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"} | {"out": args.out}, indent=2))
    else:
        allocation = report.extra.get("mixed_precision")
        print_table(report_rows(report, result.before, result.after, args.out) + (summary_rows(allocation) if allocation else []))
    return 0


def _ranks(args: argparse.Namespace) -> Any:
    """This process's ranks (``lowbit.ranks``, joined from torchrun's environment), or None when ``--nproc`` asks to
    launch them."""
    import os

    from lowbit.ranks import init_from_env

    if args.nproc < 1:
        raise LowbitError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if streamed.wanted(args) or mixed_precision.wanted(args):
            raise LowbitError("--nproc does not combine with --streamed or a mixed-precision target yet; drop one")
        return None
    ranks = init_from_env(args.device)
    if ranks.active and (streamed.wanted(args) or mixed_precision.wanted(args)):
        raise LowbitError("data-parallel ranks do not combine with --streamed or a mixed-precision target yet")
    return ranks


def _check_ranks_can_run(args: argparse.Namespace, recipe: Any) -> None:
    """The recipe's refusals under data-parallel calibration, on the model's skeleton (no weights read)."""
    from lowbit.models.loading import load_config, parse_dtype, resolve_model
    from lowbit.quantization import check_parallel
    from lowbit.stream.weights import meta_model

    config = load_config(resolve_model(args.model, args.cache), args.trust_remote_code)
    check_parallel(recipe, meta_model(config, parse_dtype(args.dtype)))


def job_from_args(args: argparse.Namespace, recipe: Any, progress: bool) -> Job:
    """The experiment job the flags describe."""
    ev = Evaluation(args.eval_dataset, args.eval_split, args.eval_seqlen, args.max_windows, args.data_dir,
                    before=True) if args.eval else None
    out = Output(args.out, args.format, args.overwrite) if args.out is not None else None
    return Job(model_source(args), recipe, calibration(args), ev, out, args.batch_size, progress=progress)


def check_outputs(args: argparse.Namespace) -> None:
    """``--out`` and ``--sensitivity`` are safe to write (nothing of the user's is lost), before any work."""
    if args.out is not None:
        inputs = input_paths(args.model, args.recipe, args.calib, args.eval_dataset, args.data_dir, cache=args.cache)
        check_output(args.out, "dir", args.overwrite, inputs, "--out")
    if args.sensitivity is not None:
        check_output(args.sensitivity, "results", option="--sensitivity")
        if args.out is not None:
            out, sens = Path(args.out).resolve(), Path(args.sensitivity).resolve()
            if out == sens or out in sens.parents or sens in out.parents:
                raise LowbitError(f"--sensitivity {args.sensitivity} and --out {args.out} overlap: the checkpoint "
                                  "would replace the sensitivity results (or the reverse); give them separate folders")


def _recipe_from_args(args: argparse.Namespace) -> Any:
    """The recipe of ``--recipe``, or the one-entry recipe of ``--method/--bits/--group-size``."""
    from lowbit.recipe import load_recipe, recipe_from_flags

    if args.recipe and args.method:
        raise LowbitError("pass either --recipe or --method/--bits/--group-size, not both")
    if args.recipe:
        if args.activations:
            raise LowbitError("--activations goes with --method; a recipe names its activation spec per entry")
        recipe = load_recipe(args.recipe)
    else:
        recipe = recipe_from_flags(args.method or "rtn", args.bits, args.group_size, not args.asym,
                                   parse_options(args.option), args.activations)
    if args.kv_cache:
        recipe.kv_cache = _kv_option(args)
    return recipe


def _kv_option(args: argparse.Namespace) -> Any:
    """The KV-cache setting of ``--kv-cache`` (it overrides the recipe's), or None."""
    if not args.kv_cache:
        return None
    from lowbit.kvcache import kv_setting

    return kv_setting(None, args.kv_cache)


def report_rows(report: Any, before: Any, after: Any, out: str | None) -> list[tuple[str, Any]]:
    """The table of one run: its report, perplexity before and after, where it was written."""
    rows: list[tuple[str, Any]] = [
        ("recipe", report.recipe["name"]),
        ("layers quantized", f"{len(report.layers)} ({report.quantized_params:,} weights)"),
        ("bits per weight", f"{report.bits_per_weight:.3f} (quantized linears, scales/zeros/outliers included)"),
        ("model bits per weight", f"{report.model_bits_per_weight:.3f} (all parameters)"),
        ("calibration", f"{report.calib_tokens:,} tokens"),
        ("mean output error", f"{report.mean_output_error():.3e}" if report.mean_output_error() is not None else "n/a"),
        ("quantization time", f"{report.seconds:.1f} s"),
        ("peak RSS", f"{report.peak_rss_mb:.0f} MiB"),
    ]
    if before is not None and after is not None:
        delta = 100 * (after.perplexity / before.perplexity - 1)
        rows += [
            ("eval data", f"{after.dataset}/{after.split}, {after.windows} windows x {after.seqlen}"),
            ("perplexity before", f"{before.perplexity:.4f}"),
            ("perplexity after", f"{after.perplexity:.4f} ({delta:+.2f}%)"),
        ]
    experts = report.extra.get("full_precision_experts")
    if experts:
        rows.append(("kept in full precision", f"{len(experts)} fused MoE expert tensors (not linear layers)"))
    moe = report.extra.get("experts")
    if moe and moe["tokens"]:
        counts = list(moe["tokens"].values())
        unrouted = f", {len(moe['unrouted'])} got none (rounded without data)" if moe["unrouted"] else ""
        rows.append(("MoE experts", f"{len(counts)} calibrated on their routed tokens "
                                    f"({min(counts):,}-{max(counts):,} each){unrouted}"))
    if out:
        rows.append(("written to", out))
    return rows
