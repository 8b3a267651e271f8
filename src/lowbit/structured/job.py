"""The structured-pruning job behind ``lowbit prune --structured``: load, plan (checked before work), calibrate,
measure perplexity before, prune, measure after, save a dense checkpoint (atomically) that plain transformers
loads, with ``lowbit_summary.json`` beside it."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from lowbit.experiment import Calibration, Evaluation, ModelSource, load
from lowbit.structured.prune import StructuredPlan, plan_for_target, prune_structured
from lowbit.structured.surgery import check_llama_layout

SUMMARY = "lowbit_summary.json"


def run_structured(source: ModelSource, calib: Calibration, plan: StructuredPlan | None = None,
                   keep_params: float | None = None, axis: str = "width",
                   evaluation: Evaluation | None = None, out: str | None = None, overwrite: bool = False,
                   batch_size: int = 8, importance: str = "activation") -> dict[str, Any]:
    """Prune ``source`` to ``plan`` (or to ``keep_params`` of its parameters along ``axis``); the summary.
    ``evaluation``: perplexity windows measured before and after."""
    import time

    from lowbit.data import get_calibration

    model, tok = load(source)
    check_llama_layout(model)
    plan = plan if plan is not None else plan_for_target(model, keep_params, axis)  # type: ignore[arg-type]
    plan.check(model)
    windows = get_calibration(calib.source, tok, calib.nsamples, calib.seqlen, calib.seed, model=model)
    summary: dict[str, Any] = {"plan": asdict(plan), "model": str(source.ref), "importance": importance}
    if evaluation is not None:
        summary["ppl_before"] = _perplexity(model, tok, evaluation)
    t0 = time.perf_counter()
    report = prune_structured(model, windows, plan, batch_size, importance)  # type: ignore[arg-type]
    summary.update(seconds=time.perf_counter() - t0, params_before=report.params_before,
                   params_after=report.params_after, fraction=report.fraction, config=report.config,
                   dropped_layers=report.dropped, calib_tokens=report.calib_tokens)
    if evaluation is not None:
        summary["ppl_after"] = _perplexity(model, tok, evaluation)
    if out is not None:
        from lowbit.quantization import save_model_dir

        save_model_dir(model, tok, out, {SUMMARY: json.dumps(summary, indent=2)}, overwrite)
    return summary


def _perplexity(model: Any, tok: Any, e: Evaluation) -> float:
    from lowbit.eval.perplexity import evaluate

    return evaluate(model, tok, e.dataset, e.split, seqlen=e.seqlen, max_windows=e.max_windows,
                    data_dir=e.data_dir).perplexity
