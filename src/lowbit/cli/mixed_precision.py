"""``lowbit quantize --target-bpw / --target-mb``: the flags' checks and the recipe builder that
measures sensitivity and allocates per-layer formats (``lowbit.analysis.mixed``) once the model
and calibration windows are loaded."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.options import parse_options
from lowbit.errors import LowbitError


def wanted(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for per-layer formats chosen by sensitivity."""
    return args.target_bpw is not None or args.target_mb is not None


def check_args(args: argparse.Namespace) -> None:
    """LowbitError for flags that do not go with a mixed-precision target (before any work)."""
    if args.recipe:
        raise LowbitError("--target-bpw / --target-mb build their own recipe; drop --recipe (use --method, "
                          "--candidates, --option)")
    if args.activations:
        raise LowbitError("--target-bpw / --target-mb allocate weight formats only; drop --activations")
    if args.sensitivity and Path(args.sensitivity).exists() and not Path(args.sensitivity).is_dir():
        raise LowbitError(f"--sensitivity {args.sensitivity} is a file: give the results directory that holds (or "
                          "will hold) sensitivity.json")


def recipe_builder(args: argparse.Namespace, progress: bool, kv_cache: Any = None) -> Any:
    """A ``lowbit.experiment.RecipeBuilder``: the allocated recipe (with ``kv_cache`` set when given)
    and ``{"mixed_precision": allocation summary}`` for the report."""
    from lowbit.analysis.candidates import parse_candidates
    from lowbit.analysis.mixed import mixed_precision_recipe
    from lowbit.recipe import load_recipe

    def build(model: Any, tok: Any, calib: Any) -> tuple[Any, dict[str, Any]]:
        method_options = parse_options(args.option)
        recipe_dict, summary = mixed_precision_recipe(
            model, tok, calib, method=args.method or "gptq", target_bpw=args.target_bpw, target_mb=args.target_mb,
            options=parse_candidates(args.candidates, not args.asym), sensitivity=args.sensitivity,
            method_options=method_options, progress=progress)
        recipe = load_recipe(recipe_dict)
        if kv_cache is not None:
            recipe.kv_cache = kv_cache
        return recipe, {"mixed_precision": summary}

    return build
