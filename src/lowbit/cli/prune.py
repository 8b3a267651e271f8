"""``lowbit prune``: one pruning step (magnitude, Wanda, SparseGPT) as an experiment job: calibrate, prune the
decoder's linear layers, evaluate, save a dense checkpoint whose pruned weights are exactly zero.

Pruning then quantizing is a recipe: ``lowbit compress --recipe sparsegpt24-gptq-w4g64``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowbit.cli import quantize
from lowbit.cli.display import print_table
from lowbit.cli.options import add_json_option, add_loading_options, add_model_options, parse_options
from lowbit.errors import LowbitError
from lowbit.experiment import run_job

PRUNERS = ("magnitude", "wanda", "sparsegpt")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a model's linear layers (magnitude, wanda, sparsegpt; unstructured or N:M)")
    add_model_options(p)
    p.add_argument("--method", default="sparsegpt", choices=PRUNERS)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each layer's weights pruned, in [0, 1)")
    p.add_argument("--pattern", default=None, metavar="N:M",
                   help="semi-structured: N of every M consecutive input weights pruned (2:4, 4:8); replaces --sparsity")
    p.add_argument("--owl", action="store_true",
                   help="OWL: prune blocks with more outlier weights less (sparsity +- 0.08 around --sparsity, same mean)")
    s = p.add_argument_group("structured pruning (a smaller dense model; Llama-layout models)")
    s.add_argument("--structured", choices=["width", "depth"], default=None,
                   help="width: MLP channels and hidden size (Minitron importance); depth: whole blocks (ShortGPT)")
    s.add_argument("--keep-params", type=float, default=None, metavar="F",
                   help="fraction of the parameters kept (e.g. 0.7), or give the sizes below")
    s.add_argument("--intermediate-size", type=int, default=None)
    s.add_argument("--heads-per-group", type=int, default=None, help="query heads kept per key/value head")
    s.add_argument("--hidden-size", type=int, default=None)
    s.add_argument("--drop-layers", type=int, default=0)
    s.add_argument("--importance", choices=["activation", "taylor"], default="activation",
                   help="ranking: activation norms + block influence (Minitron, ShortGPT), or first-order Taylor "
                        "saliency |w * grad| of the next-token loss")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    quantize.add_run_options(p, "pruned")
    p.add_argument("--format", default="auto", choices=["auto", "sparse-bitmask", "fake-quant"],
                   help="checkpoint format for --out (sparse-bitmask: the pruned linears as values + bitmask, "
                        "compressed-tensors' layout; auto: a dense checkpoint any transformers loads)")
    add_loading_options(p)
    add_json_option(p)
    p.set_defaults(func=run, recipe=None, sensitivity=None)


def prune_recipe(method: str, sparsity: float, pattern: str | None, options: dict[str, Any]) -> Any:
    """The one-entry recipe of the flags (lm_head is never pruned), checked."""
    from lowbit.recipe import recipe_from_dict

    if method not in PRUNERS:
        raise LowbitError(f"--method must be one of {', '.join(PRUNERS)}, got {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise LowbitError(f"--sparsity must be in [0, 1) (the fraction of each layer's weights pruned), got {sparsity:g}")
    opts = dict(options)
    if pattern is not None:
        opts["pattern"] = pattern
        name = f"{method}-{pattern.replace(':', 'of')}"
    else:
        opts["sparsity"] = sparsity
        name = f"{method}-{round(100 * sparsity)}{'-owl' if opts.get('owl') else ''}"
    return recipe_from_dict({"name": name, "methods": [{"method": method, "ignore": ["lm_head"], "options": opts}]},
                            name)


def run(args: argparse.Namespace) -> int:
    from lowbit.data.windows import check_batch_size

    check_batch_size(args.batch_size, "--batch-size")
    if args.structured or _sizes_given(args):
        return _run_structured(args)
    options = parse_options(args.option) | ({"owl": True} if args.owl else {})
    recipe = prune_recipe(args.method, args.sparsity, args.pattern, options)
    quantize.check_outputs(args)
    progress = not args.json and sys.stderr.isatty()
    result = run_job(quantize.job_from_args(args, recipe, progress))
    report = result.report
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"} | {"out": args.out}, indent=2))
        return 0
    pruned = [layer["sparsity"] for layer in report.to_dict()["layers"] if layer.get("sparsity") is not None]
    rows = [row for row in quantize.report_rows(report, result.before, result.after, args.out)
            if row[0] not in ("bits per weight", "model bits per weight", "layers quantized")]
    rows.insert(1, ("layers pruned", f"{len(pruned)} (mean sparsity {sum(pruned) / max(1, len(pruned)):.3f})"))
    print_table(rows)
    return 0


def _sizes_given(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.intermediate_size, args.heads_per_group, args.hidden_size)) or bool(
        args.drop_layers)


def _run_structured(args: argparse.Namespace) -> int:
    """``--structured``: cut the model down (``lowbit.structured``) and save a dense checkpoint."""
    from lowbit.cli.options import calibration, model_source
    from lowbit.experiment import Evaluation
    from lowbit.structured import StructuredPlan
    from lowbit.structured.job import run_structured

    if _sizes_given(args) == (args.keep_params is not None):
        raise LowbitError("structured pruning needs either --keep-params F (with --structured width|depth) or the "
                          "sizes (--intermediate-size, --heads-per-group, --hidden-size, --drop-layers), not both")
    if args.keep_params is not None and not 0 < args.keep_params < 1:
        raise LowbitError(f"--keep-params must be in (0, 1) (the fraction of parameters kept), got {args.keep_params:g}")
    plan = StructuredPlan(args.intermediate_size, args.heads_per_group, args.hidden_size,
                          args.drop_layers) if _sizes_given(args) else None
    quantize.check_outputs(args)
    summary = run_structured(model_source(args), calibration(args), plan, args.keep_params, args.structured or "width",
                             Evaluation(args.eval_dataset, args.eval_split, args.eval_seqlen, args.max_windows,
                                        args.data_dir) if args.eval else None, args.out, args.overwrite, args.batch_size,
                             args.importance)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [("parameters", f"{summary['params_before']:,} -> {summary['params_after']:,} ({summary['fraction']:.3f})"),
            ("config", ", ".join(f"{k} {v}" for k, v in summary["config"].items())),
            ("dropped layers", ", ".join(map(str, summary["dropped_layers"])) or "none"),
            ("calibration", f"{summary['calib_tokens']:,} tokens"), ("time", f"{summary['seconds']:.1f} s")]
    if "ppl_before" in summary:
        rows += [("perplexity before", f"{summary['ppl_before']:.4f}"), ("perplexity after", f"{summary['ppl_after']:.4f}")]
    if args.out:
        rows.append(("written to", args.out))
    print_table(rows)
    return 0
