"""``lowbit analyze`` (outlier / weight statistics, error along depth) and ``lowbit report``
(plots + Markdown + self-contained HTML from a results directory)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.display import print_table
from lowbit.cli.options import add_calibration_options, add_loading_options, add_model_options, calibration, model_source
from lowbit.errors import LowbitError
from lowbit.experiment import Job, load, run_job
from lowbit.outputs import check_output


def add_parser(sub: Any) -> None:
    """Both commands."""
    add_analyze_parser(sub)
    add_report_parser(sub)


def add_analyze_parser(sub: Any) -> argparse.ArgumentParser:
    """``lowbit analyze MODEL --out DIR``: writes DIR/analysis.json."""
    p = sub.add_parser("analyze",
                       help="activation outliers, weight distributions, error along depth vs a quantized model")
    add_model_options(p)
    add_calibration_options(p, nsamples=16, batch_size=4)
    p.add_argument("--outlier-factor", type=float, default=6.0,
                   help="a channel is an outlier when its absmax exceeds this many times the layer's median")
    p.add_argument("--quantized", default=None, metavar="PATH_OR_RECIPE",
                   help="a quantized checkpoint, or a recipe applied to a copy of MODEL: adds the error along depth")
    p.add_argument("--out", required=True, help="results directory (analysis.json is written there)")
    add_loading_options(p)
    p.set_defaults(func=cmd_analyze)
    return p


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """``lowbit report RESULTS_DIR``: plots, report.md and a self-contained report.html."""
    p = sub.add_parser("report", help="plots, report.md and self-contained report.html from a results directory")
    p.add_argument("results_dir", help="directory holding sweep.json / sensitivity.json / analysis.json")
    p.set_defaults(func=cmd_report)
    return p


def _is_checkpoint(ref: str) -> bool:
    p = Path(ref).expanduser()
    return p.is_dir() or p.suffix == ".gguf"


def _check_results_dir(out: Path, args: argparse.Namespace) -> Any:
    """A check of the loaded model: ``out`` holds no results of another model."""
    from lowbit.analysis.results import KINDS, check_same_model, model_identity, read_results

    def check(model: Any) -> None:
        identity = model_identity(model, args.model)
        for kind in KINDS:
            stored = read_results(out, kind)
            if stored is not None:
                check_same_model(stored, identity, out)

    return check


def cmd_analyze(args: argparse.Namespace) -> int:
    from lowbit.analysis.inspect import analyze_model
    from lowbit.analysis.results import write_results
    from lowbit.recipe import load_recipe

    if args.nsamples < 1 or args.seqlen < 1 or args.batch_size < 1:
        raise LowbitError("--nsamples, --seqlen and --batch-size must be positive")
    recipe = None
    if args.quantized and not _is_checkpoint(args.quantized):
        recipe = load_recipe(args.quantized)  # LowbitError naming the shipped recipes when it is neither
    out = check_output(args.out, "results", option="--out")
    # with a recipe, a copy of the model is quantized: fp_model stays as loaded
    job = Job(model_source(args), recipe, calibration(args), batch_size=args.batch_size, keep_fp=True)
    result = run_job(job, check_model=_check_results_dir(out, args))  # every check before any long work
    fp, calib = result.fp_model, result.calib
    qmodel = None
    if recipe is not None:
        qmodel = result.model
    elif args.quantized:
        qmodel = load(model_source(args, args.quantized), require_tokenizer=False)[0]
    qname = args.quantized
    res = analyze_model(fp, calib, args.model, qmodel, qname, batch_size=args.batch_size,
                        factor=args.outlier_factor, data={"source": args.calib, "seed": args.seed})
    path = write_results(out, "analysis", res)
    rows: list[tuple[str, Any]] = [("model", f"{args.model} ({res['model']['fingerprint']})"),
                                   ("tokens", res["data"]["tokens"])]
    for kind, s in res["activation_summary"].items():
        rows.append((f"{kind} max/median", f"mean {s['mean_ratio']:.1f}, max {s['max_ratio']:.1f}, "
                                           f"{s['mean_outliers']:.1f} outlier channels per layer"))
    depth = res["error_along_depth"]
    if depth:
        last = depth["blocks"][-1]
        rows.append((f"last block vs {qname}", f"rel. error {last['rel_error']:.4g} (per token "
                                                f"{last['token_rel_error']:.4g}), cosine {last['cosine']:.4f}"))
    rows.append(("written to", str(path)))
    print_table(rows)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit.analysis.report import write_report

    check_output(args.results_dir, "results", option="RESULTS_DIR")
    md, page = write_report(args.results_dir)
    print_table([("markdown", str(md)), ("html", str(page)), ("plots", str(Path(args.results_dir) / "plots"))])
    return 0
