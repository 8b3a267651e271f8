"""AWQ (Lin et al., 2023): activation-aware weight quantization, following AutoAWQ's behaviour.

Salient input channels (large mean ``|x|``) are protected by scaling them up before rounding:
for each scale group of a block (``prev`` op -> ``linears``, see ``lowbit.arch``)

1. collect ``x_mean = mean|x|`` per input channel of the group's linears;
2. grid-search ``alpha in {0, 1/grid, ..., (grid-1)/grid}`` of ``s = x_mean^alpha`` (or
   ``x_mean^alpha / w_mean^(1-alpha)`` with ``duo_scaling``), normalised by
   ``sqrt(max(s) * min(s))``, minimising the MSE of the inspected sub-module's output (the
   attention for q/k/v, the MLP for gate/up, the consuming linear for v->o / up->down) when
   the linears' weights are replaced by ``Q(W diag(s)) diag(s)^-1`` (the same as feeding
   ``x / s`` to ``Q(W diag(s))``);
3. fold the chosen scales as an exact equivalence: the ``prev`` op's output is divided by
   ``s`` (norm weight and bias, or the previous linear's weight rows and bias) and the
   linears' input columns are multiplied by ``s``.

Every group is searched on the original block, then the scales are folded (AutoAWQ's order).
Each fold is checked on one calibration window: the block's output must stay the same up to
float rounding (``FOLD_TOL``), else the fold is undone, a warning is issued and the group is
recorded as skipped (e.g. a linear -> GELU -> linear pair, where scales do not commute with
the activation).  Groups whose shapes do not allow folding are skipped and recorded too (e.g.
v_proj -> o_proj under grouped-query attention).  ``AWQ.records`` lists every group of every
block with its chosen alpha, its loss (and the alpha = 0, i.e. RTN, loss) or why it was skipped.

Weight clipping (``clip``, AutoAWQ's ``auto_clip``): after scaling, for every target linear
except q/k projections, each quantization group's range is shrunk by the ratio ``r in {1,
1 - 1/clip_grid, ..., 1 - (floor(max_shrink * clip_grid) - 1) / clip_grid}`` that minimises
the group's output error ``mean_t (x_g . (w_g - Q_r(w_g)))^2`` on up to 512 sampled input
tokens.  The ranges ``[r min, r max]`` are kept and passed to ``quantize_int`` as
``xmin``/``xmax`` by ``quantize_layer`` (for symmetric specs this is AutoAWQ's
``clamp(w, -r absmax, r absmax)``; for asymmetric specs both ends shrink by ``r``).

``quantize_layer`` is then plain RTN of the scaled (and clipped) weight with the spec: the
scales live in the previous op, so the stored bits per weight are exactly RTN's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.core.affine import fake_quant_int, group_ranges
from lowbit.core.granularity import group_view, ungroup
from lowbit.core.quant import dequantize, fake_quant, quantize, storage_bits
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, PreparedLayer, WeightMethod, register_method
from lowbit.arch import ScaleGroup, scale_groups
from lowbit.models.folding import fold_problem, fold_scales
from lowbit.models.capture import BlockInputs, block_output

CLIP_TOKENS = 512  # input tokens sampled per linear for the clipping search (AutoAWQ's n_sample_token)
# Largest accepted change of a block's output (norm, relative to the block's own update) when scales are
# folded, by parameter dtype: float rounding only (measured 3e-7 in float32 on smollm2-135m blocks 0-2).
FOLD_TOL = {torch.float32: 1e-3, torch.float64: 1e-3, None: 5e-2}
CLIP_CHUNK = 1 << 24  # elements of the (groups x rows x tokens) error product computed at once
# AutoAWQ does not clip query / key projections (names holding one of these; here the last name part).
_NO_CLIP = ("q_", "k_", "query", "key", "Wqkv")


def _slice_batch(obj: Any, b: int, k: int) -> Any:
    """Keep the first ``k`` of ``b`` rows of every batch-shaped tensor inside ``obj``."""
    if isinstance(obj, torch.Tensor):
        return obj[:k] if obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, b, k) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, b, k) for o in obj]
    if isinstance(obj, dict):
        return {key: _slice_batch(v, b, k) for key, v in obj.items()}
    return obj


def subsample_inputs(inputs: BlockInputs, n_tokens: int) -> BlockInputs:
    """Whole calibration windows (rows of the batches, in order) holding about ``n_tokens`` tokens.

    Attention needs whole sequences, so rows are kept intact; at least one row is kept.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []
    have = 0
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        if have >= n_tokens:
            break
        b, seq = h.shape[0], (h.shape[1] if h.dim() > 2 else 1)
        k = min(b, max(1, math.ceil((n_tokens - have) / seq)))
        hidden.append(h[:k])
        kwargs.append(kw if k == b else _slice_batch(kw, b, k))
        have += k * seq
    return BlockInputs(hidden, kwargs)


def _keep(obj: Any, clone: bool) -> Any:
    """Detached tensors of a call's arguments (top-level tensors cloned if ``clone``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if clone else obj.detach()
    if isinstance(obj, tuple):
        return tuple(_keep(o, clone) for o in obj)
    if isinstance(obj, dict):
        return {k: _keep(v, clone) for k, v in obj.items()}
    return obj


class _Capture:
    """Pre-hooks that keep the calls of inspected sub-modules and the inputs of target linears.

    Linears fed the same tensor (q/k/v, gate/up) share one stored copy, found by the tensor's
    address; the memo holds the tensor itself until ``end_batch`` (call it after each forward), so
    a tensor freed within the forward (q/k/v's input, once attention is done) cannot hand its
    address to another one (gate/up's input) and be mistaken for it; the key includes the tensor's
    version counter, so a buffer rewritten in place is not mistaken for its old content either.
    """

    def __init__(self, block: torch.nn.Module, inspect: set[str], linears: dict[str, torch.nn.Module]):
        self.block = block
        self.inspect = {p: block.get_submodule(p) for p in inspect}
        self.linears = linears
        self.calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = {p: [] for p in inspect}
        self._inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (tensor kept alive, copy)
        self.inputs: dict[str, torch.Tensor] = {}

    def end_batch(self) -> None:
        self._memo.clear()

    def __enter__(self) -> "_Capture":
        self._handles = []
        for p, m in self.inspect.items():
            def call_hook(module, args, kwargs, p=p):
                self.calls[p].append((_keep(args, True), _keep(dict(kwargs), False)))
            self._handles.append(m.register_forward_pre_hook(call_hook, with_kwargs=True))
        for n, m in self.linears.items():
            def in_hook(module, args, n=n):
                x = args[0].detach()
                key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)  # _version: in-place writes
                if key not in self._memo:
                    self._memo[key] = (x, x.reshape(-1, x.shape[-1]).clone())
                self._inputs[n].append(self._memo[key][1])
            self._handles.append(m.register_forward_pre_hook(in_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._memo.clear()
        joined: dict[tuple[int, ...], torch.Tensor] = {}
        for n, xs in self._inputs.items():
            if xs:
                key = tuple(id(x) for x in xs)
                if key not in joined:
                    joined[key] = torch.cat(xs) if len(xs) > 1 else xs[0]
                self.inputs[n] = joined[key]
        self._inputs = {}


@dataclass
class GroupRecord:
    """What AWQ did with one scale group of one block."""

    block: int
    prev: str
    linears: tuple[str, ...]
    alpha: float | None = None  # chosen exponent (None: skipped)
    loss: float | None = None  # inspected output MSE at the chosen alpha
    loss_rtn: float | None = None  # ... at alpha = 0 (plain RTN of the group)
    skipped: str | None = None  # why the group was left unscaled


@register_method
@dataclass
class AWQ(WeightMethod):
    """Activation-aware scale search + folding, optional clipping search, then RTN (module docstring)."""

    grid: int = bounded(20, ge=1)
    clip: bool = True
    clip_grid: int = bounded(20, ge=1)
    max_shrink: float = bounded(0.5, ge=0, lt=1)
    n_tokens: int = bounded(4096, ge=1)
    duo_scaling: bool = False
    round: bool = True  # False: scale search, folding and clipping only; a later recipe step rounds (AWQ -> GPTQ)

    name = "awq"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.records: list[GroupRecord] = []
        self._scales: dict[str, torch.Tensor] = {}  # full layer name -> input-channel scales folded in
        self._alpha: dict[str, float] = {}
        self._clip: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # full name -> (xmin, xmax) per group

    # ------------------------------------------------------------------ helpers
    def _fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.spec)  # == dequantize(quantize(w, spec)), in one pass

    def _w_mean(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Mean over output rows of |w| normalised by its quantization group's absmax (duo scaling)."""
        w = torch.cat([x.float() for x in weights], 0).abs()
        cols, gs = w.shape[1], self.spec.group_size
        if self.spec.granularity != "group" or not gs or cols % gs:
            gs = cols
        wg = w.reshape(-1, gs)
        wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
        return wg.reshape(w.shape).mean(0)

    def _scales_for(self, x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
        if w_mean is not None:
            s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1.0
        return s

    def _search(self, block: torch.nn.Module, g: ScaleGroup, cap: _Capture) -> tuple[torch.Tensor, float, float, float]:
        """Best scales of group ``g``: (s, alpha, loss, loss at alpha = 0)."""
        lins = [block.get_submodule(n) for n in g.linears]
        x = cap.inputs[g.linears[0]]
        x_mean = x.float().abs().mean(0)
        originals = [m.weight.data.clone() for m in lins]
        w_mean = self._w_mean(originals) if self.duo_scaling else None
        if g.inspect is not None:
            module = block.get_submodule(g.inspect)
            calls = cap.calls[g.inspect]

            def outputs() -> list[torch.Tensor]:
                return [block_output(module(*a, **kw)).float() for a, kw in calls]
        else:
            xs = [cap.inputs[n] for n in g.linears]

            def outputs() -> list[torch.Tensor]:
                return [m(xi).float() for m, xi in zip(lins, xs)]

        ref = outputs()
        numel = sum(r.numel() for r in ref)
        losses: list[float] = []
        best: tuple[float, float, torch.Tensor | None] = (math.inf, 0.0, None)
        try:
            for i in range(self.grid):
                alpha = i / self.grid
                s = self._scales_for(x_mean, w_mean, alpha)
                for m, w0 in zip(lins, originals):
                    sv = s.view(1, -1).to(w0.device)
                    m.weight.data.copy_((self._fake_quant(w0.float() * sv) / sv).to(w0.dtype))
                loss = sum(F.mse_loss(o, r, reduction="sum").item() for o, r in zip(outputs(), ref)) / max(numel, 1)
                losses.append(loss)
                if loss < best[0]:
                    best = (loss, alpha, s.clone())
        finally:
            for m, w0 in zip(lins, originals):
                m.weight.data.copy_(w0)
        loss, alpha, s = best
        if s is None:  # every loss was NaN: keep the identity
            s, alpha = torch.ones_like(x_mean), 0.0
        return s, alpha, loss, losses[0]

    def _clip_ranges(self, w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per quantization group ``(xmin, xmax)`` minimising each group's output error on ``x``."""
        spec = self.spec
        w = w.float()
        rows, cols = w.shape
        gs = self._clip_group(w)
        wg, layout = group_view(w, "group", gs, None, spec.padding)  # same group order as quantize_int
        pcols = layout.padded_cols
        ng = pcols // gs
        lo, hi = group_ranges(wg)
        step = max(1, x.shape[0] // CLIP_TOKENS)
        xs = x[::step][:CLIP_TOKENS].float()
        nt = xs.shape[0]
        if pcols != cols:
            xs = F.pad(xs, (0, pcols - cols))
        xt = xs.reshape(nt, ng, gs).permute(1, 2, 0)  # (ng, gs, nt)
        best_err = torch.full((rows, ng), math.inf, device=w.device)
        best_r = torch.ones(rows, ng, device=w.device)
        chunk = max(1, CLIP_CHUNK // max(1, ng * nt))
        for i in range(int(self.max_shrink * self.clip_grid + 1e-9)):
            r = 1.0 - i / self.clip_grid
            q = fake_quant_int(w, spec, xmin=lo * r, xmax=hi * r)
            d = w - q
            if pcols != cols:
                d = F.pad(d, (0, pcols - cols))
            d = d.reshape(rows, ng, gs)
            err = torch.empty(rows, ng, device=w.device)
            for a in range(0, rows, chunk):
                db = d[a : a + chunk].permute(1, 0, 2)  # (ng, rows_b, gs)
                err[a : a + chunk] = torch.bmm(db, xt).pow(2).mean(-1).T
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        ratio = best_r.reshape(-1)
        return lo * ratio, hi * ratio

    def _clip_reason(self, name: str) -> str | None:
        if self.spec.type != "int":
            return f"clipping search needs an int spec, not {self.spec.type}"
        if self.spec.granularity not in ("group", "channel"):
            return f"clipping search needs group or channel granularity, not {self.spec.granularity}"
        if any(k in name.rsplit(".", 1)[-1] for k in _NO_CLIP):
            return "query/key projection (AutoAWQ does not clip these)"
        return None

    # ------------------------------------------------------------------ the method contract
    @torch.no_grad()
    def prepare_block(self, ctx: Any) -> None:
        groups = scale_groups(ctx.model)  # a clear LowbitError for model types without groups
        block = ctx.block
        targets = {n[len(ctx.prefix):]: m for n, m in ctx.layers.items() if n.startswith(ctx.prefix)}
        skipped = {g: fold_problem(block, g, targets, "awq") for g in groups}
        plans = [g for g in groups if skipped[g] is None]
        sample = subsample_inputs(ctx.inputs, self.n_tokens)
        if not len(sample):
            raise LowbitError("AWQ needs calibration inputs, but the block received none")
        with _Capture(block, {g.inspect for g in plans if g.inspect is not None}, targets) as cap:
            for h, kw in zip(sample.hidden, sample.kwargs):
                block(h, **kw)
                cap.end_batch()

        found = [(g, *self._search(block, g, cap)) for g in plans]

        # Fold group by group; each fold must leave the block's output unchanged (checked on one
        # calibration window) or it is undone and the group recorded as skipped.
        h0 = sample.hidden[0][:1]
        kw0 = _slice_batch(sample.kwargs[0], sample.hidden[0].shape[0], 1)
        out0 = block_output(block(h0, **kw0))
        ref, ref_dtype = out0.float(), out0.dtype
        scale = max((ref - h0.float()).norm().item(), 1e-6 * ref.norm().item(), 1e-30)  # the block's own update
        tol = FOLD_TOL.get(ref_dtype, FOLD_TOL[None])
        applied = []
        for g, s, alpha, loss, loss0 in found:
            prev, lins = block.get_submodule(g.prev), [block.get_submodule(n) for n in g.linears]
            params = [p for m in (prev, *lins) for p in m.parameters(recurse=False)]
            saved = [p.data.clone() for p in params]
            fold_scales(prev, lins, s)
            change = (block_output(block(h0, **kw0)).float() - ref).norm().item() / scale
            if not change <= tol:
                for p, p0 in zip(params, saved):
                    p.data.copy_(p0)
                skipped[g] = (f"folding scales into {g.prev} changed the block output by {change:.1e} (relative to "
                              f"the block's update, limit {tol:g} for {ref_dtype}): not an exact equivalence here")
                warnings.warn(f"awq: block {ctx.index}: {skipped[g]}; group left unscaled", stacklevel=3)
                continue
            applied.append((g, s, alpha, loss, loss0))
        chosen = {g: (alpha, loss, loss0) for g, s, alpha, loss, loss0 in applied}
        for g in groups:
            if g in chosen:
                alpha, loss, loss0 = chosen[g]
                self.records.append(GroupRecord(ctx.index, g.prev, g.linears, alpha=alpha, loss=loss, loss_rtn=loss0))
            else:
                self.records.append(GroupRecord(ctx.index, g.prev, g.linears, skipped=skipped[g]))
        for g, s, alpha, loss, loss0 in applied:
            for n in g.linears:
                self._scales[ctx.prefix + n] = s.detach().cpu()
                self._alpha[ctx.prefix + n] = alpha

        if self.clip:
            folded = {n: s for g, s, *_ in applied for n in g.linears}
            for n, m in targets.items():
                if self._clip_reason(n) is not None or n not in cap.inputs:
                    continue
                x = cap.inputs[n]
                if n in folded:
                    x = x.float() / folded[n].to(x.device)
                self._clip[ctx.prefix + n] = self._clip_ranges(m.weight.data, x)

    def rounds(self) -> bool:
        return self.round

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        """``round: false``: the scales are folded already; the clipping ranges become a clamp of the weight
        per quantization group (AutoAWQ's ``apply_clip``), for the next step to round."""
        w = layer.weight.data
        clip = self._clip.pop(name, None)
        if clip is not None:
            wg, layout = group_view(w.float(), "group", self._clip_group(w), None, self.spec.padding)
            clamped = torch.minimum(torch.maximum(wg, clip[0].view(-1, 1)), clip[1].view(-1, 1))
            w.copy_(ungroup(clamped, layout).to(w.dtype))
        alpha = self._alpha.pop(name, None)
        self._scales.pop(name, None)
        kept = "unscaled" if alpha is None else f"alpha {alpha:.2f}"
        return PreparedLayer(mask=stats.mask, note=f"awq {kept}{', clipped' if clip is not None else ''}")

    def _clip_group(self, w: torch.Tensor) -> int:
        return self.spec.group_size if self.spec.granularity == "group" else w.shape[1]

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = layer.weight.data
        clip = self._clip.pop(name, None)
        kwargs = {} if clip is None else {"xmin": clip[0], "xmax": clip[1]}
        qt = quantize(w.float(), self.spec, **kwargs)
        return LayerResult(
            weight=dequantize(qt).to(w.dtype),
            bits_per_weight=storage_bits(qt, self.spec.scale_dtype),
            form=qt,
            artifacts={"quantized": qt, "awq_scales": self._scales.pop(name, None),
                       "awq_alpha": self._alpha.pop(name, None), "clip_range": clip},
        )
