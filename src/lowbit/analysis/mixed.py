"""Automatic mixed precision: per-layer sensitivity at each candidate format, a knapsack allocation
under a bits-per-weight or size budget, and the recipe that quantizes each layer at its format.

The budget covers the decoder-block linears the recipe quantizes (codes + scales + zero points,
as ``lowbit_summary.json`` counts ``bits_per_weight``); embeddings, norms and ``lm_head`` stay as
they are and are not part of it.  ``target_mb`` is in MB of 10^6 bytes.

Sensitivity is measured with RTN quantize-dequantize (``lowbit.analysis.sensitivity``) on the
first ``eval_windows`` calibration windows cut to ``eval_seqlen`` tokens (calibration text, never
the test split the result is evaluated on); the chosen method (GPTQ by default) then quantizes
each layer at its format.  The allocation assumes RTN's ranking of layers carries over to the
method and that per-layer losses add up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.analysis.allocate import allocate, cost_range
from lowbit.analysis.candidates import DEFAULT_CANDIDATES, Candidate, as_candidates
from lowbit.analysis.results import check_same_model, model_identity, read_results, write_results
from lowbit.analysis.sensitivity import measure_sensitivity, target_linears
from lowbit.data.windows import check_token_windows
from lowbit.errors import LowbitError
from lowbit.methods import get_method

LOSSES = ("kl", "proxy")


def _model_name(model: torch.nn.Module) -> str:
    source = getattr(model, "lowbit_source", None)
    return getattr(source, "ref", None) or type(model).__name__


def layer_costs(model: torch.nn.Module, candidates: Sequence[Candidate]) -> dict[str, tuple[int, list[int]]]:
    """Every decoder linear -> (its number of weights, its exact stored bits at each candidate);
    LowbitError where a group size does not fit a layer."""
    out = {}
    for name, (_, m) in target_linears(model).items():
        for c in candidates:
            c.check_layer(name, m.in_features)
        out[name] = (m.out_features * m.in_features, [c.cost_bits(m.out_features, m.in_features) for c in candidates])
    return out


def budget_bits(table: dict[str, tuple[int, list[int]]], candidates: Sequence[Candidate], target_bpw: float | None,
                target_mb: float | None) -> tuple[float, int]:
    """(budget in bits, number of weights) for ``layer_costs``' table; LowbitError for a missing,
    double or unreachable target, naming the smallest and largest bits per weight the candidates allow."""
    if (target_bpw is None) == (target_mb is None):
        raise LowbitError("give exactly one of target_bpw (bits per weight) or target_mb (MB of quantized linears)")
    weights = sum(n for n, _ in table.values())
    costs = [c for _, c in table.values()]
    budget = target_bpw * weights if target_bpw is not None else target_mb * 8e6
    if not budget > 0 or not math.isfinite(budget):
        raise LowbitError(f"the target must be a positive number, got {target_bpw if target_mb is None else target_mb}")
    low, high = cost_range(costs)
    totals = [sum(c[k] for c in costs) for k in range(len(candidates))]
    cheapest, widest = candidates[totals.index(min(totals))], candidates[totals.index(max(totals))]
    what = f"{target_bpw} bits per weight" if target_bpw is not None else f"{target_mb} MB"
    if math.floor(budget) < low:
        raise LowbitError(f"target {what} is below the smallest allocation the candidates allow: "
                          f"{low / weights:.4f} bpw ({low / 8e6:.3f} MB, every layer at {cheapest.label}); "
                          "raise the target or add a cheaper candidate")
    if math.floor(budget) > high:
        raise LowbitError(f"target {what} is above the largest allocation the candidates allow: "
                          f"{high / weights:.4f} bpw ({high / 8e6:.3f} MB, every layer at {widest.label}); "
                          "lower the target or add a wider candidate")
    return budget, weights


def _check_stored(stored: dict[str, Any], identity: dict[str, Any], candidates: Sequence[Candidate],
                  names: Iterable[str], where: str) -> None:
    check_same_model(stored, identity, where)
    have = {c["label"] for c in stored.get("candidates", [])}
    missing = [c.label for c in candidates if c.label not in have]
    if missing:
        raise LowbitError(f"{where} has no sensitivity for candidate(s) {', '.join(missing)} (it has "
                          f"{', '.join(sorted(have)) or 'none'}); measure again with these candidates")
    layers = {l["name"] for l in stored.get("layers", [])}
    absent = [n for n in names if n not in layers]
    if absent:
        raise LowbitError(f"{where} lacks layers such as {absent[0]}; measure the sensitivity of every decoder linear")


def get_sensitivity(model: torch.nn.Module, calib: torch.Tensor, candidates: Sequence[Candidate],
                    sensitivity: dict[str, Any] | str | Path | None = None, eval_windows: int = 4,
                    eval_seqlen: int = 128, progress: bool = False) -> tuple[dict[str, Any], bool]:
    """(sensitivity result, reused?): ``sensitivity`` given as a result dict or a results directory
    holding one (checked against the model and candidates) is reused; otherwise it is measured on
    the first ``eval_windows`` windows of ``calib`` cut to ``eval_seqlen`` tokens (and written to the
    directory when one was given)."""
    identity = model_identity(model, _model_name(model))
    names = list(target_linears(model))
    if isinstance(sensitivity, dict):
        _check_stored(sensitivity, identity, candidates, names, "the given sensitivity")
        return sensitivity, True
    if sensitivity is not None:
        stored = read_results(sensitivity, "sensitivity")
        if stored is not None:
            _check_stored(stored, identity, candidates, names, str(sensitivity))
            return stored, True
    ids = eval_ids(calib, eval_windows, eval_seqlen)
    result = measure_sensitivity(model, ids, candidates, name=identity["name"], progress=progress,
                                 source=f"first {eval_windows} calibration windows x {eval_seqlen} tokens")
    if sensitivity is not None:
        write_results(sensitivity, "sensitivity", result)
    return result, False


def eval_ids(calib: torch.Tensor, windows: int, seqlen: int) -> torch.Tensor:
    """The first ``windows`` calibration windows cut to ``seqlen`` tokens (LowbitError when too few)."""
    check_token_windows(calib, "sensitivity")
    if calib.shape[0] < windows or calib.shape[1] < seqlen:
        raise LowbitError(f"sensitivity needs {windows} calibration windows of at least {seqlen} tokens, got "
                          f"{calib.shape[0]} x {calib.shape[1]}; pass more or longer windows")
    return calib[:windows, :seqlen]


def build_recipe(names: Sequence[str], choice: Sequence[int], candidates: Sequence[Candidate], method: str,
                 method_options: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """A recipe dict with one entry per candidate used, targeting its layers by exact name."""
    entries = []
    for k, c in enumerate(candidates):
        layers = [n for n, ck in zip(names, choice) if ck == k]
        if layers:
            entries.append({"method": method, "spec": c.spec.to_dict(), "targets": layers, "ignore": ["lm_head"],
                            "options": dict(method_options or {})})
    return {"name": name, "methods": entries}


def mixed_precision_recipe(
    model: torch.nn.Module,
    tok: Any = None,
    calib: torch.Tensor | None = None,
    method: str = "gptq",
    target_bpw: float | None = None,
    target_mb: float | None = None,
    options: Iterable[tuple[int, int | None] | Candidate] = DEFAULT_CANDIDATES,
    symmetric: bool = True,
    sensitivity: dict[str, Any] | str | Path | None = None,
    method_options: dict[str, Any] | None = None,
    loss: str = "kl",
    eval_windows: int = 4,
    eval_seqlen: int = 128,
    solver: str = "auto",
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe dict, allocation summary) quantizing each decoder linear of ``model`` with ``method`` at
    the candidate format (``options``: ``(bits, group_size)``, group None = per channel) that minimises
    the summed measured sensitivity within the budget (see the module docstring).

    ``calib``: calibration windows; sensitivity uses the first ``eval_windows`` of them cut to
    ``eval_seqlen`` tokens (without ``calib``, 128 x 512 WikiText-2 validation windows, seed 0, are
    made with ``tok``).  ``sensitivity``: a stored result (dict or results directory) to reuse.
    ``loss``: ``kl`` (measured) or ``proxy`` (the Hessian-diagonal weight error; cruder, it ignores
    what later layers do with a layer's error).  Every input is checked before any work.
    """
    if loss not in LOSSES:
        raise LowbitError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    candidates = as_candidates(options, symmetric)
    for c in candidates:
        get_method(method, c.spec, method_options)  # unknown method / option: clear error now
    table = layer_costs(model, candidates)
    budget, weights = budget_bits(table, candidates, target_bpw, target_mb)
    if calib is None:
        if tok is None:
            raise LowbitError("mixed_precision_recipe needs calibration windows (calib=) or a tokenizer to make them")
        from lowbit.data import get_calibration

        calib = get_calibration("wikitext2", tok, 128, 512, 0)
    t0 = time.perf_counter()
    sens, reused = get_sensitivity(model, calib, candidates, sensitivity, eval_windows, eval_seqlen, progress)
    seconds = time.perf_counter() - t0
    by_name = {l["name"]: l for l in sens["layers"]}
    names = list(table)
    costs = [table[n][1] for n in names]
    losses = [[float(by_name[n]["options"][c.label][loss]) for c in candidates] for n in names]
    alloc = allocate(costs, losses, budget, solver)
    achieved = alloc.cost / weights
    recipe = build_recipe(names, alloc.choice, candidates, method, method_options,
                          f"{method}-mixed-{achieved:.2f}bpw")
    uniform = {}
    for k, c in enumerate(candidates):
        uniform[c.label] = {"bpw": sum(cost[k] for cost in costs) / weights,
                            "predicted_loss": math.fsum(l[k] for l in losses)}
    summary = {
        "method": method, "target_bpw": target_bpw, "target_mb": target_mb, "budget_bits": math.floor(budget),
        "weights": weights, "layers_allocated": len(names), "achieved_bpw": achieved, "achieved_mb": alloc.cost / 8e6,
        "counts": {c.label: sum(1 for k in alloc.choice if k == i) for i, c in enumerate(candidates)},
        "weights_by_option": {c.label: sum(table[n][0] for n, k in zip(names, alloc.choice) if k == i)
                              for i, c in enumerate(candidates)},
        "loss": loss, "predicted_loss": alloc.loss, "lower_bound": alloc.lower_bound, "solver": alloc.method,
        "exact": alloc.exact, "saturated": alloc.saturated, "uniform": uniform,
        "layers": {n: candidates[k].label for n, k in zip(names, alloc.choice)},
        "sensitivity": {"reused": reused, "seconds": seconds, "eval": sens.get("eval"),
                        "spearman_proxy": sens.get("spearman_proxy"), "spearman_seeds": sens.get("spearman_seeds")},
    }
    return recipe, summary


# ---------------------------------------------------------------- the `lowbit quantize --target-bpw` table
def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for the CLI table: target, achieved size, layers per format, predicted loss, sensitivity."""
    target = (f"{summary['target_bpw']} bpw" if summary["target_bpw"] is not None else f"{summary['target_mb']} MB")
    counts = ", ".join(f"{lab}: {n}" for lab, n in summary["counts"].items() if n)
    sens = summary["sensitivity"]
    ev = sens.get("eval") or {}
    how = ("reused" if sens["reused"] else f"measured in {sens['seconds']:.0f} s") + \
          f" ({ev.get('windows')} x {ev.get('seqlen')} tokens, RTN, one layer at a time)"
    return [
        ("mixed precision", f"target {target}: {summary['achieved_bpw']:.4f} bpw, {summary['achieved_mb']:.3f} MB "
                            f"over {summary['layers_allocated']} linears"),
        ("layers per format", counts),
        (f"predicted {summary['loss']} (sum)", f"{summary['predicted_loss']:.4g} (lower bound "
                                               f"{summary['lower_bound']:.4g}, {summary['solver']} solver)"),
        ("sensitivity", how),
    ]
