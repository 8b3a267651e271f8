"""``lowbit analyze`` (outlier / weight statistics, error along depth) and ``lowbit report``
(plots + Markdown + self-contained HTML from a results directory)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from lowbit.cli_common import add_model_options, print_table
from lowbit.errors import LowbitError
from lowbit.outputs import check_output


def _is_checkpoint(ref: str) -> bool:
    p = Path(ref).expanduser()
    return p.is_dir() or p.suffix == ".gguf"


def _quantized_model(args: argparse.Namespace, model: Any, recipe: Any, calib: Any) -> Any:
    """The model given by ``--quantized``: a checkpoint loaded from disk, or a copy of ``model``
    quantized with ``recipe`` on the analysis calibration windows."""
    if recipe is None:
        from lowbit.models.loading import load_model

        qmodel, _ = load_model(args.quantized, dtype=args.dtype, device=args.device, cache=args.cache,
                               trust_remote_code=args.trust_remote_code, require_tokenizer=False)
        return qmodel
    from lowbit.quantization import quantize

    qmodel = copy.deepcopy(model)
    quantize(qmodel, recipe, calib, batch_size=args.batch_size, progress=False)
    return qmodel


def _check_results_dir(out: Path, identity: dict[str, Any]) -> None:
    from lowbit.analysis.results import KINDS, check_same_model, read_results

    for kind in KINDS:
        stored = read_results(out, kind)
        if stored is not None:
            check_same_model(stored, identity, out)


def cmd_analyze(args: argparse.Namespace) -> int:
    from lowbit.analysis.inspect import analyze_model
    from lowbit.analysis.results import model_identity, write_results
    from lowbit.data import get_calibration
    from lowbit.eval.perplexity import check_seqlen
    from lowbit.models.loading import load_model
    from lowbit.recipe import load_recipe, resolve_targets

    if args.nsamples < 1 or args.seqlen < 1 or args.batch_size < 1:
        raise LowbitError("--nsamples, --seqlen and --batch-size must be positive")
    recipe = None
    if args.quantized and not _is_checkpoint(args.quantized):
        recipe = load_recipe(args.quantized)  # LowbitError naming the shipped recipes when it is neither
    out = check_output(args.out, "results", option="--out")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, cache=args.cache,
                            trust_remote_code=args.trust_remote_code)
    _check_results_dir(out, model_identity(model, args.model))  # every check before any long work
    if recipe is not None:
        resolve_targets(model, recipe)
    check_seqlen(model, args.seqlen)
    calib = get_calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed, model=model)
    qmodel = _quantized_model(args, model, recipe, calib) if args.quantized else None
    qname = args.quantized
    result = analyze_model(model, calib, args.model, qmodel, qname, batch_size=args.batch_size,
                           factor=args.outlier_factor, data={"source": args.calib, "seed": args.seed})
    path = write_results(out, "analysis", result)
    rows: list[tuple[str, Any]] = [("model", f"{args.model} ({result['model']['fingerprint']})"),
                                   ("tokens", result["data"]["tokens"])]
    for kind, s in result["activation_summary"].items():
        rows.append((f"{kind} max/median", f"mean {s['mean_ratio']:.1f}, max {s['max_ratio']:.1f}, "
                                           f"{s['mean_outliers']:.1f} outlier channels per layer"))
    depth = result["error_along_depth"]
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


def add_analyze_parser(sub: Any) -> argparse.ArgumentParser:
    """``lowbit analyze MODEL --out DIR``: writes DIR/analysis.json."""
    p = sub.add_parser("analyze",
                       help="activation outliers, weight distributions, error along depth vs a quantized model")
    add_model_options(p)
    p.add_argument("--calib", default="wikitext2", help="wikitext2, ptb, c4, selfgen or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass")
    p.add_argument("--outlier-factor", type=float, default=6.0,
                   help="a channel is an outlier when its absmax exceeds this many times the layer's median")
    p.add_argument("--quantized", default=None, metavar="PATH_OR_RECIPE",
                   help="a quantized checkpoint, or a recipe applied to a copy of MODEL: adds the error along depth")
    p.add_argument("--out", required=True, help="results directory (analysis.json is written there)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_analyze)
    return p


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """``lowbit report RESULTS_DIR``: plots, report.md and a self-contained report.html."""
    p = sub.add_parser("report", help="plots, report.md and self-contained report.html from a results directory")
    p.add_argument("results_dir", help="directory holding sweep.json / sensitivity.json / analysis.json")
    p.set_defaults(func=cmd_report)
    return p
