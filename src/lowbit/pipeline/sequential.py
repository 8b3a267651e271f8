"""The sequential calibration pipeline: one decoder block at a time, with error propagation.

For each block: (1) methods may transform the whole block (AWQ scale search), (2) a forward
pass with hooks collects the statistics the methods need (Hessians, activation magnitudes),
(3) each target linear is quantized, (4) the quantized block is re-run so the next block is
calibrated on quantized outputs.  Only the current block's activations are held.  Blocks
whose layers need no statistics skip step (2): their sample inputs are taken during step (4).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.activations.attach import attach_input_quantizer
from lowbit.activations.quantizer import ActQuantizer, ClusterActQuantizer
from lowbit.errors import LowbitError
from lowbit.methods.base import LayerStats, WeightMethod, get_method
from lowbit.models.arch import architecture_of, decoder_blocks
from lowbit.pipeline.memory import release_freed_memory
from lowbit.pipeline.capture import BlockInputs, block_output, capture_block_inputs
from lowbit.pipeline.stats import StatsCollector, output_error
from lowbit.transforms.rptq import CLUSTERS_ATTR


@dataclass
class LayerReport:
    """How one layer was quantized and what it cost."""

    name: str
    method: str
    shape: tuple[int, int]
    bits_per_weight: float
    output_error: float | None  # ||X(W-Wq)^T||^2 / ||XW^T||^2 on sampled calibration inputs
    weight_error: float  # ||W-Wq||^2 / ||W||^2
    extra_params: int = 0
    seconds: float = 0.0
    note: str | None = None  # e.g. the RTN fallback of a layer no calibration token reached


@dataclass
class BlockContext:
    """What ``WeightMethod.prepare_block`` gets: the block, its inputs and its target layers."""

    model: torch.nn.Module
    block: torch.nn.Module
    index: int
    prefix: str  # full name of the block, with a trailing dot
    inputs: BlockInputs
    layers: dict[str, torch.nn.Module]  # this method's targets in the block, by full name
    methods: dict[str, WeightMethod] = field(default_factory=dict)  # method of each layer (for transforms)


@dataclass
class PipelineResult:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calib_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "seconds": self.seconds, "calib_tokens": self.calib_tokens}


def _weight_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    denom = w.float().pow(2).sum().item()
    return (w.float() - wq.float()).pow(2).sum().item() / denom if denom > 0 else 0.0


@torch.no_grad()
def _collect_stats(block: torch.nn.Module, inputs: BlockInputs, collector: StatsCollector) -> None:
    """Run the block for its hooks only: outputs are dropped batch by batch."""
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        block(h, **kw)
        collector.end_batch()


@torch.no_grad()
def _propagate(block: torch.nn.Module, inputs: BlockInputs, collector: StatsCollector | None = None) -> BlockInputs:
    """Replace each batch of ``inputs`` by the block's output for it (in place: one copy held)."""
    for j, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        inputs.hidden[j] = block_output(block(h, **kw))
        if collector is not None:
            collector.end_batch()
    return inputs


def _with_fallback(name: str, method: WeightMethod, stats: dict[str, LayerStats]) -> tuple[WeightMethod, str | None]:
    """RTN with the same spec for a data-driven method's layer that no calibration token reached
    (an expert the router never chose): reported, never a NaN or a crash."""
    if not (method.needs_hessian or method.needs_act_stats):
        return method, None
    if name in stats and stats[name].nsamples > 0:
        return method, None
    warnings.warn(f"{name}: no calibration tokens reached this layer; {method.name} falls back to RTN", stacklevel=4)
    return get_method("rtn", method.spec, activations=method.activations), f"no calibration tokens: RTN instead of {method.name}"


def _quantize_layers(
    assignments: dict[str, WeightMethod],
    modules: dict[str, torch.nn.Module],
    stats: dict[str, LayerStats],
    keep_originals: bool = False,
) -> tuple[list[LayerReport], dict[str, torch.Tensor]]:
    """Quantize each assigned layer in place; with ``keep_originals``, also return fp copies of the weights."""
    reports, originals = [], {}
    for name, assigned in assignments.items():
        layer = modules[name]
        t0 = time.perf_counter()
        method, note = _with_fallback(name, assigned, stats)
        res = method.quantize_layer(name, layer, stats.get(name, LayerStats()))
        w = layer.weight.data
        if keep_originals:
            originals[name] = w.clone()
        reports.append(LayerReport(
            name=name, method=method.name, shape=tuple(w.shape), bits_per_weight=res.bits_per_weight,
            output_error=output_error(stats[name].sample_inputs, w, res.weight) if name in stats else None,
            weight_error=_weight_error(w, res.weight), extra_params=res.extra_params,
            seconds=time.perf_counter() - t0, note=note,
        ))
        w.copy_(res.weight)
        layer.lowbit_artifacts = res.artifacts
        layer.lowbit_spec = method.spec
    return reports, originals


def _layer_input_quantizer(name: str, method: WeightMethod, layer: torch.nn.Module) -> ActQuantizer | None:
    """The method's input quantizer for ``layer``, with what transforms left on the layer: an OS+ shift,
    RPTQ's channel clusters (which turn a static per-tensor spec into per-cluster ranges)."""
    q = method.input_quantizer(name)
    if q is None:
        return None
    clusters = getattr(layer, CLUSTERS_ATTR, None)
    if clusters is not None:
        if type(q) is not ActQuantizer:
            raise LowbitError(f"{name}: {method.name} quantizes its inputs its own way ({type(q).__name__}); "
                              "it cannot take RPTQ's channel clusters")
        q = ClusterActQuantizer(q.spec, clusters)
    q.shift = getattr(layer, "lowbit_input_shift", None)  # set by the os_plus transform
    return q


@torch.no_grad()
def _quantize_inputs(block: torch.nn.Module, inputs: BlockInputs, mine: dict[str, WeightMethod],
                     modules: dict[str, torch.nn.Module]) -> None:
    """Attach input quantizers to the block's layers that have an activation spec; static ones are
    calibrated on the block's (already quantized upstream) calibration inputs first."""
    quantizers = {}
    for n, m in mine.items():
        q = _layer_input_quantizer(n, m, modules[n])
        if q is not None:
            quantizers[n] = attach_input_quantizer(modules[n], q)
    static = {n: q for n, q in quantizers.items() if not q.spec.dynamic}
    if not static:
        return
    handles = [modules[n].register_forward_pre_hook(lambda mod, args, q=q: q.observe(args[0])) for n, q in static.items()]
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            block(h, **kw)
    finally:
        for h in handles:
            h.remove()
    for q in static.values():
        q.freeze()


@torch.no_grad()
def run_sequential(
    model: torch.nn.Module,
    assignments: dict[str, WeightMethod],
    calib: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    transforms: list[Any] | None = None,
) -> PipelineResult:
    """Quantize ``assignments`` (full layer name -> method) block by block on ``calib`` (n, seqlen);
    ``transforms`` (``lowbit.transforms``) rewrite each block first."""
    t_start = time.perf_counter()
    modules = dict(model.named_modules())
    blocks = decoder_blocks(model)
    prefix_root = architecture_of(model).blocks
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
    result = PipelineResult(calib_tokens=inputs.tokens)
    bar = tqdm(range(len(blocks)), desc="quantize", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        prefix = f"{prefix_root}.{i}."
        mine = {n: m for n, m in assignments.items() if n.startswith(prefix)}
        if not mine:
            _propagate(block, inputs)
            continue
        for t in transforms or ():
            t.apply_block(BlockContext(model, block, i, prefix, inputs, {n: modules[n] for n in mine}, mine))
        contexts = [(m, BlockContext(model, block, i, prefix, inputs, {n: modules[n] for n, mm in mine.items() if mm is m}))
                    for m in {id(m): m for m in mine.values()}.values()]
        for method, ctx in contexts:
            method.prepare_block(ctx)
        hessian = {n for n, m in mine.items() if m.needs_hessian}
        act = {n for n, m in mine.items() if m.needs_act_stats}
        layer_modules = {n: modules[n] for n in mine}
        data_free = not (hessian or act)
        stats: dict[str, LayerStats] = {}
        if not data_free:
            collector = StatsCollector(layer_modules, hessian, act)
            with collector.attached():
                _collect_stats(block, inputs, collector)
            stats = collector.finalize()
        reports, originals = _quantize_layers(mine, modules, stats, keep_originals=data_free)
        _quantize_inputs(block, inputs, mine, modules)
        for method, ctx in contexts:
            method.finish_block(ctx)
        if data_free:  # sample the layers' inputs while propagating, for their output errors
            collector = StatsCollector(layer_modules, set(), set())
            with collector.attached():
                _propagate(block, inputs, collector)
            stats = collector.finalize()
            for r in reports:
                wq = modules[r.name].weight.data
                r.output_error = output_error(stats[r.name].sample_inputs, originals[r.name], wq)
        else:
            _propagate(block, inputs)
        result.layers.extend(reports)
        errs = [r.output_error for r in reports if r.output_error is not None]
        if errs:
            bar.set_postfix(err=f"{sum(errs) / len(errs):.2e}")
        del stats
        release_freed_memory()
    result.seconds = time.perf_counter() - t_start
    return result
