"""The sequential calibration pipeline: one decoder block at a time, with error propagation.

For each block, for each stage (staged recipes such as AWQ's scales then GPTQ's rounding; stages
are aligned at the end, so every layer's last step runs in the block's last stage, after every
other layer of the block was prepared): (1) the stage's steps may transform the whole block (AWQ scale
search), (2) a forward pass with hooks collects the statistics they need (Hessians, activation
magnitudes) on the block as the earlier stages left it, (3) each target linear is rounded (or,
for a non-rounding step, rewritten in full precision: pruned, clamped).  Then (4) the block is
re-run so the next block is calibrated on quantized outputs.  Only the current block's
activations are held.  Stages whose layers need no statistics skip step (2): the sample inputs
of their rounded layers are taken during step (4).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.activations.attach import attach_input_quantizer
from lowbit.activations.quantizer import ActQuantizer
from lowbit.methods.base import LayerStats, PreparedLayer, WeightMethod
from lowbit.methods.lorc import with_lorc
from lowbit.arch import architecture_of, decoder_blocks
from lowbit.pipeline.memory import release_freed_memory
from lowbit.models.capture import BlockInputs, block_output, capture_block_inputs
from lowbit.pipeline.stats import StatsCollector, output_error
from lowbit.quantized_layers import mark_quantized
from lowbit.ranks import Ranks, broadcast
from lowbit.ranks import current as current_ranks


@dataclass
class LayerReport:
    """How one layer was quantized and what it cost."""

    name: str
    method: str
    shape: tuple[int, int]
    bits_per_weight: float
    output_error: float | None  # ||X(W-Wq)^T||^2 / ||XW^T||^2 on sampled calibration inputs, W as the rounding
    # step received it (after earlier steps' scaling, clamping or pruning, which it does not count)
    weight_error: float  # ||W-Wq||^2 / ||W||^2
    extra_params: int = 0
    seconds: float = 0.0
    note: str | None = None  # e.g. the RTN fallback of a layer no calibration token reached
    steps: list[str] = field(default_factory=list)  # every step the layer went through, in order
    sparsity: float | None = None  # fraction of exact zeros in the final weight, when a step pruned it
    tokens: int | None = None  # calibration rows the layer saw (fewer than the run's for a MoE expert)


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
def propagate(block: torch.nn.Module, inputs: BlockInputs, collector: StatsCollector | None = None) -> BlockInputs:
    """Replace each batch of ``inputs`` by the block's output for it (in place: one copy held); ``collector``
    (optional) is told where each batch ends."""
    for j, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        inputs.hidden[j] = block_output(block(h, **kw))
        if collector is not None:
            collector.end_batch()
    return inputs


def _round_layer(name: str, assigned: WeightMethod, layer: torch.nn.Module, stats: dict[str, LayerStats],
                 keep_original: bool) -> tuple[LayerReport, torch.Tensor | None]:
    """Round one layer in place with its step; with ``keep_original``, also return an fp copy of its weight."""
    t0 = time.perf_counter()
    layer_stats = stats.get(name, LayerStats())
    method, note = assigned, None
    fallback = assigned.fallback(name, layer, layer_stats)
    if fallback is not None:
        warnings.warn(f"{name}: no calibration tokens reached this layer; {assigned.name} falls back to "
                      f"{fallback.name.upper()}", stacklevel=3)
        method, note = fallback, f"no calibration tokens: {fallback.name.upper()} instead of {assigned.name}"
    res = method.quantize_layer(name, layer, layer_stats)
    w = layer.weight.data
    if assigned.lorc_rank:
        res = with_lorc(res, w, assigned.lorc_rank, layer_stats.hessian)
    original = w.clone() if keep_original else None
    report = LayerReport(
        name=name, method=method.name, shape=tuple(w.shape), bits_per_weight=res.bits_per_weight,
        output_error=output_error(stats[name].sample_inputs, w, res.weight) if name in stats else None,
        weight_error=_weight_error(w, res.weight), extra_params=res.extra_params,
        seconds=time.perf_counter() - t0, note=note, tokens=layer_stats.nsamples if name in stats else None,
    )
    w.copy_(res.weight)
    mark_quantized(layer, res.stored(method))
    return report, original


def round_outer(outer: dict[str, tuple[torch.nn.Module, WeightMethod]]) -> list[LayerReport]:
    """Round the input embedding and output head named by a recipe (``recipe.resolve_outer_targets``: data-free
    steps) in place, before the blocks are calibrated on what the embedding now gives."""
    reports = []
    for name, (module, method) in outer.items():
        report, _ = _round_layer(name, method, module, {}, keep_original=False)
        report.steps = [method.name]
        reports.append(report)
    return reports


def _prepare_layer(name: str, method: WeightMethod, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
    """Let a non-rounding step rewrite one layer; the mask it leaves includes every earlier one."""
    prepared = method.prepare_layer(name, layer, stats)
    if stats.mask is not None and prepared.mask is None:
        prepared.mask = stats.mask
    return prepared


def _layer_input_quantizer(name: str, method: WeightMethod, transforms: list[Any]) -> ActQuantizer | None:
    """The step's input quantizer for layer ``name``, adapted by each transform to what it left on the
    layer's inputs (an OS+ shift, RPTQ's channel clusters)."""
    q = method.input_quantizer(name)
    for t in transforms:
        q = t.input_quantizer(name, q)
    return q


@torch.no_grad()
def _quantize_inputs(block: torch.nn.Module, inputs: BlockInputs, mine: dict[str, WeightMethod],
                     modules: dict[str, torch.nn.Module], transforms: list[Any]) -> None:
    """Attach input quantizers to the block's layers that have an activation spec; static ones are
    calibrated on the block's (already quantized upstream) calibration inputs first."""
    quantizers = {}
    for n, m in mine.items():
        q = _layer_input_quantizer(n, m, transforms)
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


@dataclass
class _LayerTrack:
    """What the stages did to one layer so far."""

    steps: list[str] = field(default_factory=list)
    mask: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    stored_params: int | None = None  # a factorizing step's stored values


def _as_stages(assignments: dict[str, Any]) -> dict[str, list[WeightMethod]]:
    """``layer -> [steps]`` (a single step per layer is accepted as well)."""
    return {n: list(m) if isinstance(m, (list, tuple)) else [m] for n, m in assignments.items()}


@torch.no_grad()
def _run_stage(model: torch.nn.Module, block: torch.nn.Module, index: int, prefix: str, inputs: BlockInputs,
               stage: dict[str, WeightMethod], modules: dict[str, torch.nn.Module],
               tracks: dict[str, _LayerTrack], transforms: list[Any]) -> tuple[list[LayerReport], dict[str, torch.Tensor]]:
    """One stage of one block: prepare, collect statistics, round or rewrite each layer, quantize inputs,
    finish.  Returns the rounded layers' reports and, where no statistics were collected or the step trains
    after rounding, their fp weights (their errors are measured while the block propagates).  Across ranks
    (``lowbit.ranks``) the statistics are summed over all of them and each rounding is done by one rank."""
    ranks = current_ranks()
    contexts = [(m, BlockContext(model, block, index, prefix, inputs,
                                 {n: modules[n] for n, mm in stage.items() if mm is m}))
                for m in {id(m): m for m in stage.values()}.values()]
    for method, ctx in contexts:
        method.prepare_block(ctx)
    wanted = {n: m.statistics(n, modules[n]) for n, m in stage.items()}
    collected = any(wanted.values())
    stats: dict[str, LayerStats] = {}
    if collected:
        collector = StatsCollector({n: modules[n] for n in stage}, wanted)
        with collector.attached():
            _collect_stats(block, inputs, collector)
        stats = collector.finalize(across_ranks=ranks.active)
    for n, track in tracks.items():
        if n in stage and track.mask is not None:
            stats.setdefault(n, LayerStats()).mask = track.mask
    rounding = [n for n, m in stage.items() if m.rounds()]
    owner = {n: ranks.owner(k) for k, n in enumerate(rounding)}
    made: dict[str, tuple[LayerReport, torch.Tensor | None]] = {}
    for name, method in stage.items():
        tracks[name].steps.append(method.name)
        if method.rounds():
            if owner[name] != ranks.rank:
                continue  # another rank rounds it (data-parallel calibration); its result is broadcast below
            # a step that trains the block after rounding (finish_block) changes the weight again: its layers'
            # errors are measured on the final weight, while the block propagates
            trains = method.overrides("finish_block")
            made[name] = _round_layer(name, method, modules[name], stats, keep_original=not collected or trains)
        else:
            prepared = _prepare_layer(name, method, modules[name], stats.get(name, LayerStats()))
            tracks[name].mask = prepared.mask
            if prepared.stored_params is not None:
                tracks[name].stored_params = prepared.stored_params
            if prepared.note:
                tracks[name].notes.append(prepared.note)
    if ranks.active:
        _share_rounded(rounding, made, modules, ranks)
    reports, originals = [], {}
    for name in rounding:
        report, original = made[name]
        reports.append(report)
        if original is not None:
            originals[name] = original
    rounded = {n: m for n, m in stage.items() if m.rounds()}
    _quantize_inputs(block, inputs, rounded, modules, transforms)
    for method, ctx in contexts:
        method.finish_block(ctx)
    return reports, originals


def _share_rounded(rounding: list[str], made: dict[str, tuple[LayerReport, torch.Tensor | None]],
                   modules: dict[str, torch.nn.Module], ranks: Ranks) -> None:
    """Broadcast each rounded layer from the rank that rounded it (weight, stored form, report, fp copy), so every
    rank holds the same block."""
    for k, name in enumerate(rounding):
        src, layer = ranks.owner(k), modules[name]
        mine = name in made
        payload = (made[name], layer.weight.data, layer.quantized) if mine else None
        (report, original), weight, stored = broadcast(payload, src)
        if not mine:
            layer.weight.data.copy_(weight)
            mark_quantized(layer, stored)
            made[name] = (report, original)


def _unrounded_report(name: str, layer: torch.nn.Module, stored_params: int | None = None) -> LayerReport:
    """A layer whose steps all kept full precision (pruned or factorized): stored at its element width, in
    ``stored_params`` values when a step factorized it."""
    w = layer.weight.data
    share = 1.0 if stored_params is None else stored_params / w.numel()
    return LayerReport(name=name, method="none", shape=tuple(w.shape), bits_per_weight=8.0 * w.element_size() * share,
                       output_error=None, weight_error=0.0)


class BlockHooks:
    """What a streamed run does around each block (``lowbit.stream``): read its weights before, write and free
    them after.  The in-memory run has none."""

    def load(self, index: int, block: torch.nn.Module) -> None:
        """Before block ``index`` is compressed or run."""

    def done(self, index: int, block: torch.nn.Module, reports: list[LayerReport], inputs: BlockInputs) -> None:
        """After block ``index`` is compressed and ``inputs`` hold its outputs (the next block's inputs)."""


@torch.no_grad()
def run_sequential(
    model: torch.nn.Module,
    assignments: dict[str, Any],
    calib: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    transforms: list[Any] | None = None,
    hooks: BlockHooks | None = None,
    inputs: BlockInputs | None = None,
    start: int = 0,
) -> PipelineResult:
    """Run each layer's steps (full layer name -> [steps] in order, or a single step) block by block on
    ``calib`` (n, seqlen); ``transforms`` (``lowbit.transforms``) rewrite each block first.  A streamed run
    passes ``hooks``, and when it resumes, the ``inputs`` of block ``start`` (blocks before it are done)."""
    t_start = time.perf_counter()
    every_step = _as_stages(assignments)
    # steps that train rounded layers (qat-e2e) do no per-layer work: they act in finish_model only
    staged = {n: [m for m in steps if not m.after_rounding] for n, steps in every_step.items()}
    staged = {n: steps for n, steps in staged.items() if steps}
    modules = dict(model.named_modules())
    for step in {id(m): m for steps in every_step.values() for m in steps}.values():
        mine = {n: modules[n] for n, steps in every_step.items() if any(s is step for s in steps)}
        step.prepare_model(model, calib, mine, batch_size)  # whole-model work before the blocks (OWL's pass)
    blocks = decoder_blocks(model)
    prefix_root = architecture_of(model).blocks
    if inputs is None:
        inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
    result = PipelineResult(calib_tokens=inputs.tokens)
    bar = tqdm(range(start, len(blocks)), desc="quantize", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        prefix = f"{prefix_root}.{i}."
        if hooks is not None:
            hooks.load(i, block)
        mine = {n: steps for n, steps in staged.items() if n.startswith(prefix)}
        if not mine:
            propagate(block, inputs)
            if hooks is not None:
                hooks.done(i, block, [], inputs)
            continue
        for t in transforms or ():
            final = {n: steps[-1] for n, steps in mine.items()}
            t.apply_block(BlockContext(model, block, i, prefix, inputs, {n: modules[n] for n in mine}, final))
        tracks = {n: _LayerTrack() for n in mine}
        reports: list[LayerReport] = []
        originals: dict[str, torch.Tensor] = {}
        depth = max(len(steps) for steps in mine.values())
        for k in range(depth):  # aligned at the end: every layer's rounding step runs in the block's last stage
            stage = {n: steps[k - depth + len(steps)] for n, steps in mine.items() if k >= depth - len(steps)}
            r, o = _run_stage(model, block, i, prefix, inputs, stage, modules, tracks, list(transforms or ()))
            reports += r
            originals.update(o)
        reports += [_unrounded_report(n, modules[n], tracks[n].stored_params) for n in mine if not mine[n][-1].rounds()]
        if originals:  # sample the data-free layers' inputs while propagating, for their output errors
            collector = StatsCollector({n: modules[n] for n in originals})
            with collector.attached():
                propagate(block, inputs, collector)
            stats = collector.finalize()
            for r in reports:
                if r.name in originals:
                    final = modules[r.name].weight.data
                    r.output_error = output_error(stats[r.name].sample_inputs, originals[r.name], final)
                    r.weight_error = _weight_error(originals[r.name], final)
                    r.tokens = stats[r.name].nsamples
            del stats
        else:
            propagate(block, inputs)
        for r in reports:
            track = tracks[r.name]
            r.steps = track.steps
            if track.notes:
                r.note = "; ".join([*track.notes, *([r.note] if r.note else [])])
            if track.mask is not None or any(m.prunes for m in mine[r.name]):
                r.sparsity = (modules[r.name].weight.data == 0).float().mean().item()
        result.layers.extend(reports)
        errs = [r.output_error for r in reports if r.output_error is not None]
        if errs:
            bar.set_postfix(err=f"{sum(errs) / len(errs):.2e}")
        if hooks is not None:
            hooks.done(i, block, reports, inputs)
        release_freed_memory()
    for step in {id(m): m for steps in every_step.values() for m in steps}.values():
        step.finish_model(model, calib)  # end-to-end work (training) once every block is done, in recipe order
    result.seconds = time.perf_counter() - t_start
    return result
