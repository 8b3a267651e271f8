"""The experiment job: load a model, take calibration windows, apply a recipe, evaluate, save.

``lowbit quantize`` / ``lowbit compress``, every configuration of a sweep and ``lowbit analyze``
all run :func:`run_job`; they differ only in the :class:`Job` they describe.  Every check that
needs the loaded model (recipe targets, the compressed-tensors format, window lengths, and the
caller's own ``check_model``) runs before the calibration windows are read, so a bad job fails
before any long work.  Checks that need no model (the output path guard, flag conflicts) are the
caller's, before ``run_job``: only it knows which option to name.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from lowbit.errors import LowbitError

if TYPE_CHECKING:  # torch, transformers and the recipe machinery load when a job runs, not on import
    import torch

    from lowbit.recipe import Recipe

    RecipeRef = Union[str, Path, dict[str, Any], Recipe]
    # Builds the recipe once the model and calibration windows are there (mixed precision measures the
    # layers' sensitivity first): (model, tokenizer, windows) -> (recipe, entries for the report's extra).
    RecipeBuilder = Callable[[torch.nn.Module, Any, torch.Tensor], tuple[Recipe, dict[str, Any]]]
Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    """The default log: one line on stderr."""
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class ModelSource:
    """Which model to load and how (``lowbit.models.loading.load_model``'s arguments)."""

    ref: str | os.PathLike[str]
    dtype: str = "float32"
    device: str = "cpu"
    cache: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Calibration:
    """The calibration windows: ``nsamples`` windows of ``seqlen`` tokens of ``source``."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Evaluation:
    """Perplexity windows and what to compare: ``before`` also measures the model before the recipe
    (KV cache off), ``against_fp`` adds KL and top-1 agreement against the unquantized model."""

    dataset: str = "wikitext2"
    split: str = "test"
    seqlen: int = 2048
    max_windows: int | None = None
    data_dir: str | None = None
    before: bool = False
    against_fp: bool = False


@dataclass(frozen=True)
class Output:
    """Where the quantized checkpoint goes (``lowbit.quantization.save_quantized``'s arguments)."""

    path: str | os.PathLike[str]
    format: str = "auto"
    overwrite: bool = False


@dataclass(frozen=True)
class Job:
    """One experiment.  ``recipe``: a recipe (name, file, dict or object), a builder called with the
    model and calibration windows, or None (load and calibrate only).  ``keep_fp`` keeps an
    unquantized copy of the model in the result (it is kept anyway for ``eval.against_fp``)."""

    model: ModelSource
    recipe: RecipeRef | RecipeBuilder | None
    calib: Calibration = Calibration()
    eval: Evaluation | None = None
    out: Output | None = None
    batch_size: int = 8
    keep_fp: bool = False
    progress: bool = False


@dataclass
class JobResult:
    """What a job produced.  ``model`` is quantized when a recipe ran; ``fp_model`` is the model as
    loaded (kept when asked for; the same object as ``model`` when no recipe ran)."""

    model: torch.nn.Module
    tokenizer: Any
    calib: torch.Tensor
    recipe: Recipe | None = None
    report: Any | None = None  # lowbit.quantization.QuantizationReport
    fp_model: torch.nn.Module | None = None
    before: Any | None = None  # lowbit.eval.perplexity.EvalResult
    after: Any | None = None
    quant_seconds: float | None = None  # wall time of the recipe (device synchronized)
    peak_device_mb: float | None = None  # peak accelerator memory while the recipe ran (None on CPU)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load(source: ModelSource, require_tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``source``."""
    from lowbit.models.loading import load_model

    return load_model(source.ref, dtype=source.dtype, device=source.device, cache=source.cache,
                      trust_remote_code=source.trust_remote_code, require_tokenizer=require_tokenizer)


def ready_kv(model: Any, tokenizer: Any, setting: Any, source: str, windows: torch.Tensor | None = None,
             log: Log = log_stderr) -> Any:
    """The KV-cache setting to use, KVQuant's level tables fitted now when it needs them (told on ``log``)."""
    from lowbit.kvcache.calibrate import ready_kv_setting

    return ready_kv_setting(model, tokenizer, setting, source, windows, log=log)


def run_job(job: Job, check_model: Callable[[torch.nn.Module], None] | None = None,
            log: Log = log_stderr) -> JobResult:
    """Run ``job``: load, check (``check_model`` too), calibrate, apply the recipe, evaluate, save.

    With ``job.out`` the checkpoint is written and the report's ``extra["format"]`` says in which
    format; with ``job.eval`` and ``before`` both measurements land in ``extra["eval"]``.
    LowbitError for anything lowbit refuses."""
    from lowbit.data import get_calibration
    from lowbit.recipe import Recipe, load_recipe

    recipe = load_recipe(job.recipe) if isinstance(job.recipe, (str, Path, dict, Recipe)) else None
    model, tok = load(job.model)
    if check_model is not None:
        check_model(model)
    _check_before_work(job, model, recipe)
    calib = get_calibration(job.calib.source, tok, job.calib.nsamples, job.calib.seqlen, job.calib.seed, model=model)
    result = JobResult(model, tok, calib)
    if job.recipe is None:
        result.fp_model = model if job.keep_fp else None
        return result
    notes: dict[str, Any] = {}
    if recipe is None:
        recipe, notes = job.recipe(model, tok, calib)  # type: ignore[operator]
    if job.keep_fp or (job.eval is not None and job.eval.against_fp):
        result.fp_model, result.model = model, copy.deepcopy(model)  # the loaded model stays as it was
    result.recipe = recipe
    if job.eval is not None and job.eval.before:
        result.before = _evaluate(result.model, tok, job, kv_cache="none")
    _apply_recipe(job, result, log)
    result.report.extra.update(notes)
    if job.eval is not None:
        result.after = _evaluate(result.model, tok, job, reference=result.fp_model if job.eval.against_fp else None)
        if result.before is not None:
            result.report.extra["eval"] = {"before": result.before.to_dict(), "after": result.after.to_dict()}
    if job.out is not None:
        from lowbit.quantization import save_quantized

        _, written = save_quantized(result.model, tok, result.report, job.out.path, job.out.format,
                                    overwrite=job.out.overwrite)
        result.report.extra["format"] = written
    return result


def _check_before_work(job: Job, model: torch.nn.Module, recipe: Recipe | None) -> None:
    """What the loaded model can refuse: the recipe's targets, compressed-tensors for Conv1D layers,
    window lengths beyond its context."""
    from lowbit.eval.perplexity import check_seqlen
    from lowbit.recipe import resolve_targets

    if recipe is not None:
        targets = resolve_targets(model, recipe)
        if job.out is not None and job.out.format == "compressed-tensors":
            from lowbit.export.compressed_tensors import conv1d_problem

            problem = conv1d_problem(model, targets)
            if problem is not None:
                raise LowbitError(f"cannot write compressed-tensors: {problem} (--format fake-quant)")
    check_seqlen(model, job.calib.seqlen)
    if job.eval is not None:
        check_seqlen(model, job.eval.seqlen)


def _apply_recipe(job: Job, result: JobResult, log: Log) -> None:
    """Quantize ``result.model`` in place (timed, peak device memory measured), then fit the recipe's
    KV-cache setting on the quantized model when it needs calibrating and attach it to the model."""
    import torch

    from lowbit.eval.memory import device_peak_mb, reset_device_peak
    from lowbit.quantization import quantize

    recipe, device = result.recipe, result.device
    assert recipe is not None
    reset_device_peak(device)
    t0 = time.perf_counter()
    result.report = quantize(result.model, recipe, result.calib, batch_size=job.batch_size, progress=job.progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.quant_seconds = time.perf_counter() - t0
    result.peak_device_mb = device_peak_mb(device)
    if recipe.kv_cache is not None and not recipe.kv_cache.calibrated:  # KVQuant levels, on the quantized model
        recipe.kv_cache = ready_kv(result.model, result.tokenizer, recipe.kv_cache, job.calib.source, result.calib, log)
        result.report.recipe["kv_cache"] = recipe.kv_cache.to_dict()
    result.model.lowbit_kv_cache = recipe.kv_cache  # evaluation after quantization reads the recipe's KV cache


def _evaluate(model: Any, tokenizer: Any, job: Job, **kw: Any) -> Any:
    """Perplexity of ``model`` on the job's evaluation windows."""
    from lowbit.eval.perplexity import evaluate

    e = job.eval
    assert e is not None
    return evaluate(model, tokenizer, e.dataset, e.split, seqlen=e.seqlen, max_windows=e.max_windows,
                    progress=job.progress, data_dir=e.data_dir, **kw)
