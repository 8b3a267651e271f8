"""``lowbit.quantize``: apply a recipe to a model, and write the result with its summary."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lowbit.arch import architecture_of
from lowbit.atomic import absolute, allow_replace, atomic_dir, check_replaceable
from lowbit.data.windows import check_batch_size, check_token_windows
from lowbit.errors import LowbitError
from lowbit.export import FORMATS
from lowbit.jsonable import to_jsonable
from lowbit.experts import expert_calibration, fuse_experts, fuse_state, unfuse_experts
from lowbit.lowrank_layers import factorize_modules, lowrank_ranks, write_ranks
from lowbit.eval.memory import peak_rss_mb
from lowbit.pipeline.sequential import PipelineResult, round_outer, run_sequential
from lowbit.ranks import current as current_ranks
from lowbit.ranks import shard_windows, total
from lowbit.recipe import Recipe, load_recipe, resolve_outer_targets, resolve_targets

SUMMARY_FILE = "lowbit_summary.json"


@dataclass
class QuantizationReport:
    """Machine-readable summary of one quantization run."""

    recipe: dict[str, Any]
    layers: list[dict[str, Any]]
    quantized_params: int
    bits_per_weight: float  # over the quantized linears, scales / zeros / outliers included
    model_params: int
    model_bits_per_weight: float  # whole model, unquantized tensors at their storage width
    seconds: float
    calib_tokens: int
    peak_rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (methods' records may be dataclasses or tensors)."""
        return to_jsonable(dict(self.__dict__))

    def mean_output_error(self) -> float | None:
        errs = [l["output_error"] for l in self.layers if l["output_error"] is not None]
        return sum(errs) / len(errs) if errs else None


def _model_bits(model: torch.nn.Module, quantized: dict[str, float]) -> tuple[int, float]:
    """Total parameters and bits: quantized linears at their bits, everything else at its dtype width."""
    total_bits = 0.0
    total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in quantized:
            total_bits += p.numel() * quantized[layer]
        else:
            total_bits += p.numel() * p.element_size() * 8
    return total, total_bits / max(total, 1)


MIN_STATIC_TOKENS = 256  # fewer calibration tokens than this cannot fix a per-tensor activation range


def _check_static_calibration(rec: Recipe, calib: torch.Tensor) -> None:
    static = [e.method for e in rec.entries if e.activations is not None and not e.activations.dynamic]
    if static and calib.numel() < MIN_STATIC_TOKENS:
        raise LowbitError(f"static activation ranges ({static[0]} entry) need at least {MIN_STATIC_TOKENS} calibration "
                          f"tokens, got {calib.numel()}; pass more windows (--nsamples) or a dynamic spec (A8_TOKEN)")


def quantize(
    model: torch.nn.Module,
    recipe: str | Path | dict[str, Any] | Recipe,
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize ``model`` in place with ``recipe`` using calibration token windows ``calib`` (n, seqlen).

    All input is validated (recipe, targets, group sizes, calibration shape) before any work.
    """
    check_batch_size(batch_size)
    rec = load_recipe(recipe)
    unfused = unfuse_experts(model)  # MoE experts as linears: each calibrated on the tokens routed to it
    try:
        assignments, outer, transforms, calib = _checked_run(model, rec, calib)
    except LowbitError:
        fuse_experts(model)  # refused before work: the model is left as it came
        raise
    if rec.kv_cache is not None:
        model.lowbit_kv_cache = rec.kv_cache  # the cache the model will run with: training steps (LLM-QAT) read it
    t0 = time.perf_counter()
    for t in transforms:
        t.apply_model(model)
    modules = dict(model.named_modules())
    outer_reports = round_outer({n: (modules[n], step) for n, step in outer.items()})
    result: PipelineResult = run_sequential(model, assignments, calib, batch_size, progress, transforms)
    result.layers[:0] = outer_reports
    seconds = time.perf_counter() - t0
    tokens = result.calib_tokens
    if current_ranks().active:
        tokens = total(tokens)
    report = build_report(rec, result.to_dict()["layers"], model, seconds, tokens,
                          _records(transforms, [m for steps in assignments.values() for m in steps]))
    experts = fused_experts(model)
    if experts:
        warnings.warn(f"{len(experts)} fused expert weight tensors ({experts[0]}, ...) stay in full precision: lowbit "
                      "rounds linear layers, and transformers keeps MoE experts as 3-D parameters", stacklevel=2)
        report.extra["full_precision_experts"] = experts
    if unfused:
        report.extra["experts"] = expert_report(report.layers, unfused)
    factorize_modules(model)  # low-rank steps' layers become two linears (after the bits are counted)
    return report


def expert_report(layers: list[dict[str, Any]], unfused: list[str]) -> dict[str, Any]:
    """Per-expert calibration counts of a MoE run, with a warning naming the experts no token reached."""
    calibration = expert_calibration(layers)
    unrouted = calibration["unrouted"]
    if unrouted:
        warnings.warn(f"{len(unrouted)} of {len(calibration['tokens'])} experts got no calibration token "
                      f"({unrouted[0]}, ...): rounded without data (data-driven steps fell back to RTN); more "
                      "calibration windows reach more experts", stacklevel=3)
    return {"modules": unfused, **calibration}


def _checked_run(model: torch.nn.Module, rec: Recipe, calib: torch.Tensor | None
                 ) -> tuple[dict[str, list[Any]], dict[str, Any], list[Any], torch.Tensor]:
    """Everything ``quantize`` checks before work: the targets (in the blocks, and the embedding / head), the
    transforms and this rank's share of the windows."""
    assignments = resolve_targets(model, rec)
    outer = resolve_outer_targets(model, rec)
    if calib is None:
        raise LowbitError("quantize() needs calibration windows (lowbit.data.get_calibration(...)), even for "
                          "data-free methods: they are used to measure each layer's output error")
    check_token_windows(calib, "quantization's calibration")
    _check_static_calibration(rec, calib)
    transforms = rec.build_transforms()
    for t in transforms:
        t.check_model(model)
    ranks = current_ranks()
    if ranks.active:  # data-parallel calibration (lowbit.ranks): this rank's share of the windows
        _check_parallel(rec, assignments, transforms, model)
        calib = shard_windows(calib, ranks)
    return assignments, outer, transforms, calib


def check_parallel(recipe: str | Path | dict[str, Any] | Recipe, model: torch.nn.Module) -> None:
    """Refuse what data-parallel calibration cannot do with ``recipe`` on ``model`` (its parameters may be on the
    meta device), before ranks are started."""
    rec = load_recipe(recipe)
    _check_parallel(rec, resolve_targets(model, rec), rec.build_transforms(), model)


def _check_parallel(rec: Recipe, assignments: dict[str, list[Any]], transforms: list[Any],
                    model: torch.nn.Module) -> None:
    """What data-parallel calibration cannot do yet (steps that fit on the block's inputs themselves would fit
    on each rank's share alone), refused before work."""
    fix = "run it in one process"
    if transforms:
        raise LowbitError(f"transform {rec.transforms[0].transform!r} fits on each rank's windows alone under "
                          f"data-parallel calibration; {fix}")
    modules = dict(model.named_modules())
    for name, steps in assignments.items():
        for step in steps:
            whole = step.needs_whole_model()
            if whole or step.overrides("prepare_block") or step.overrides("finish_block"):
                raise LowbitError(f"step {step.name!r} ({whole or 'it fits on the block inputs itself'}) is not "
                                  f"data-parallel yet; {fix}")
            if step.activations is not None and not step.activations.dynamic:
                raise LowbitError(f"step {step.name!r} fixes static input ranges, which are not combined across "
                                  f"ranks yet; use a dynamic activation spec or {fix}")
            odd = [type(s).__name__ for s in step.statistics(name, modules[name]) if not s.reducible()]
            if odd:
                raise LowbitError(f"step {step.name!r} gathers {odd[0]}, which is not combined across ranks; {fix}")


def fused_experts(model: torch.nn.Module) -> list[str]:
    """The decoder blocks' 3-D parameters (mixture-of-experts weights fused over experts), which no step rounds."""
    prefix = architecture_of(model).blocks + "."
    return [n for n, p in model.named_parameters() if p.dim() == 3 and n.startswith(prefix)]


def build_report(rec: Recipe, layers: list[dict[str, Any]], model: torch.nn.Module, seconds: float, calib_tokens: int,
                 extra: dict[str, Any]) -> QuantizationReport:
    """The report of a run whose layer reports are ``layers`` (``model``'s parameters may be on the meta device)."""
    per_layer_bits = {l["name"]: l["bits_per_weight"] for l in layers}
    qparams = sum(l["shape"][0] * l["shape"][1] for l in layers)
    qbits = sum(l["shape"][0] * l["shape"][1] * l["bits_per_weight"] for l in layers) / max(qparams, 1)
    total, model_bpw = _model_bits(model, per_layer_bits)
    return QuantizationReport(
        recipe=rec.to_dict(), layers=layers, quantized_params=qparams, bits_per_weight=qbits,
        model_params=total, model_bits_per_weight=model_bpw, seconds=seconds,
        calib_tokens=calib_tokens, peak_rss_mb=peak_rss_mb(), extra=extra,
    )


def _records(transforms: list[Any], methods: Any) -> dict[str, Any]:
    """What transforms and methods logged per block (searched alphas, distillation losses ...)."""
    extra: dict[str, Any] = {}
    if transforms:
        extra["transforms"] = {t.name: t.records for t in transforms}
    logged = list({id(m): m for m in methods if getattr(m, "records", None)}.values())
    if logged:
        names = [m.name for m in logged]  # two entries of one method: awq, awq#2
        extra["methods"] = {(n if names[:i].count(n) == 0 else f"{n}#{names[:i].count(n) + 1}"): m.records
                            for i, (n, m) in enumerate(zip(names, logged))}
    return extra


def save_quantized(model: torch.nn.Module, tokenizer: Any, report: QuantizationReport | None, out: str | Path,
                   format: str = "auto", extra_files: dict[str, str] | None = None, overwrite: bool = False,
                   ) -> tuple[Path, str]:
    """Write the quantized model, tokenizer, recipe and summary to ``out`` atomically.

    ``format``: ``compressed-tensors`` (packed int weights, loadable by transformers / vLLM and by
    lowbit), ``fake-quant`` (dequantized fp weights any transformers loads, plus
    ``lowbit_codes.safetensors`` when the layers have integer codes and ``lowbit_activations.json``
    when their inputs are quantized), ``sparse-bitmask`` (a pruned full-precision model, its pruned linears
    as values + bitmask), or ``auto`` (compressed-tensors when
    every quantized layer fits it).  ``extra_files`` (name -> text) are written beside.
    Returns ``(out, format written)``.  The directory appears
    only when everything is written.  An existing ``out`` is replaced only when it is empty or
    lowbit wrote it, or with ``overwrite``; never the working directory, home or the root
    (``lowbit.atomic``): LowbitError before anything is written.
    """
    if format not in ("auto", *FORMATS):
        raise LowbitError(f"unknown format {format!r}; choose one of auto, {', '.join(FORMATS)}")
    out = Path(out)
    with allow_replace(out) if overwrite else contextlib.nullcontext():
        check_replaceable(absolute(out))
        return _write_quantized(model, tokenizer, report, out, format, extra_files)


def _write_lowrank(model: torch.nn.Module, tokenizer: Any, out: Path, extra: dict[str, str]) -> Path:
    """A model with low-rank layers: their two factors (``NAME.down`` / ``NAME.up``) and their ranks, which lowbit's
    loader reads back; ``lowbit export --format fake-quant`` writes the dense products for any transformers."""
    from lowbit.packed.qlinear import int_weights

    if int_weights(model, strict=False):
        raise LowbitError("this model has both quantized and low-rank layers, which no one checkpoint format holds "
                          "here; write fake-quant (dense weights)")
    with atomic_dir(out) as tmp:
        _write_model(tmp, model, tokenizer, extra)
        write_ranks(model, tmp)
    return out


def _write_model(tmp: Path, model: torch.nn.Module, tokenizer: Any, extra: dict[str, str],
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """``model`` (``state`` if given), its tokenizer and the ``extra`` text files into the directory ``tmp``."""
    from lowbit.export.compressed_tensors import write_beside_weights

    state = fuse_state(model, model.state_dict() if state is None else state)  # MoE experts as transformers has them
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    write_beside_weights(tmp, None, tokenizer, extra)  # save_pretrained wrote the generation config


def save_model_dir(model: torch.nn.Module, tokenizer: Any, out: str | Path, extra_files: dict[str, str],
                   overwrite: bool = False) -> Path:
    """A full-precision model (pruned, distilled ...) with its tokenizer and ``extra_files`` written to ``out``
    atomically (replacing only what lowbit wrote, or anything with ``overwrite``)."""
    out = Path(out)
    with allow_replace(out) if overwrite else contextlib.nullcontext(), atomic_dir(out) as tmp:
        _write_model(tmp, model, tokenizer, extra_files)
    return out


def _write_quantized(model: torch.nn.Module, tokenizer: Any, report: QuantizationReport | None, out: Path,
                     format: str, extra_files: dict[str, str] | None) -> tuple[Path, str]:
    """``save_quantized`` once the target is known to be replaceable."""
    from lowbit.activations.io import ACTIVATIONS_FILE, activations_json
    from lowbit.export.codes import CODES_FILE, write_codes
    from lowbit.export.compressed_tensors import collect_exportable, write_compressed_tensors
    from lowbit.export.dense import dense_state_dict
    from lowbit.kvcache.config import KV_CACHE_FILE
    from lowbit.packed.qlinear import int_weights

    extra = dict(extra_files or {})
    if report is not None:
        extra.update({"recipe.yaml": yaml.safe_dump(report.recipe, sort_keys=False),
                      SUMMARY_FILE: json.dumps(report.to_dict(), indent=2)})
    kv = report.recipe.get("kv_cache") if report is not None else None
    if kv is None and getattr(model, "lowbit_kv_cache", None) is not None:  # a loaded checkpoint's setting
        kv = model.lowbit_kv_cache.to_dict()
    if kv:
        extra[KV_CACHE_FILE] = json.dumps(kv, indent=1)
    if lowrank_ranks(model) and format in ("auto", "lowrank"):
        return _write_lowrank(model, tokenizer, out, extra), "lowrank"
    if lowrank_ranks(model) and format not in ("fake-quant",):
        raise LowbitError(f"{format} cannot hold low-rank layers; write the factors (format auto) or dense products "
                          "(fake-quant)")
    if format == "sparse-bitmask":
        from lowbit.export.sparse_bitmask import write_sparse_bitmask

        return write_sparse_bitmask(model, tokenizer, out, extra), format
    ct_weights, ct_inputs, problem = collect_exportable(model)
    if format == "auto":
        format = "compressed-tensors" if problem is None else "fake-quant"
    if format == "compressed-tensors":
        if problem is not None:
            from lowbit.export.gguf_meta import GGUF_ARCH

            gguf = (", or 'lowbit export --format gguf' (re-rounded to a GGUF type)"
                    if getattr(model.config, "model_type", None) in GGUF_ARCH else "")
            raise LowbitError(f"cannot write compressed-tensors: {problem}; formats that can hold these weights: "
                              f"fake-quant (any transformers){gguf}")
        write_compressed_tensors(model, tokenizer, out, ct_weights, ct_inputs, extra)
        return out, format
    weights = int_weights(model, strict=False)
    with atomic_dir(out) as tmp:
        _write_model(tmp, model, tokenizer, extra, dense_state_dict(model))
        if weights:
            write_codes(weights, tmp / CODES_FILE)
        acts = activations_json(model)
        if acts is not None:
            (tmp / ACTIVATIONS_FILE).write_text(acts)
    return out, format
