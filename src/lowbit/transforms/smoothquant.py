"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before W8A8 quantization.

For the linears fed by one op (q/k/v by the attention norm, gate/up by the MLP norm), each input
channel ``j`` is divided by ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` inside the feeding op
and multiplied back into the weight columns: ``(X / s)(W * s)^T = X W^T`` exactly, but the
activations lose their outlier channels.  ``alpha`` is the migration strength (0.5 in the paper);
``alpha: search`` picks it per layer group from a grid by the output error of the group's linears
with the weight and activation formats they will be quantized with, on sampled calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from lowbit.activations.quantizer import ActQuantizer
from lowbit.arch import ScaleGroup, scale_groups
from lowbit.core.quant import fake_quant
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.models.folding import fold_problem, fold_scales
from lowbit.spec import QuantSpec
from lowbit.transforms.base import BlockTransform, register_transform

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10 .. 0.90


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, floor: float = 1e-5) -> torch.Tensor:
    """Per-channel ``s = x_max^alpha / w_max^(1 - alpha)``; channels with no activation or weight keep 1."""
    x = x_absmax.float().clamp(min=floor)
    w = w_absmax.float().clamp(min=floor)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    dead = (x_absmax <= 0) | (w_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=floor))


class SmoothingScorer:
    """Scores candidate per-channel scales (and shifts) for one group: the relative output error, summed
    over the linears, of quantizing ``x / s`` (less ``shift`` before the input quantizer, added back
    after) and ``W * s``, against fp outputs computed once."""

    def __init__(self, x: torch.Tensor, weights: list[torch.Tensor], wspec: QuantSpec, aspec: QuantSpec | None):
        self.x, self.wspec, self.aspec = x, wspec, aspec
        self.weights = [w.float() for w in weights]
        self.refs = [x @ w.T for w in self.weights]
        self.norms = [max(r.pow(2).sum().item(), 1e-30) for r in self.refs]

    def error(self, s: torch.Tensor, shift: torch.Tensor | None = None) -> float:
        xs = self.x / s
        if self.aspec is not None:
            q = ActQuantizer(self.aspec)
            q.shift = shift
            q.observe(xs)
            q.freeze()
            xs = q(xs)
        return sum((xs @ fake_quant(w * s, self.wspec).T - ref).pow(2).sum().item() / n
                   for w, ref, n in zip(self.weights, self.refs, self.norms))


class GroupInputs:
    """Pre-hooks on each group's first linear: per-channel min and max over every token, and sampled rows."""

    def __init__(self, layers: dict[str, torch.nn.Module], rows: int):
        self.layers, self.rows = layers, rows
        self.cmin: dict[str, torch.Tensor] = {}
        self.cmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    @property
    def absmax(self) -> dict[str, torch.Tensor]:
        return {n: torch.maximum(self.cmin[n].abs(), self.cmax[n].abs()) for n in self.cmin}

    def hook(self, name: str):
        def fn(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            lo, hi = x.amin(0), x.amax(0)
            self.cmin[name] = lo if name not in self.cmin else torch.minimum(self.cmin[name], lo)
            self.cmax[name] = hi if name not in self.cmax else torch.maximum(self.cmax[name], hi)
            kept = sum(t.shape[0] for t in self.samples[name])
            if kept < self.rows:
                step = max(1, x.shape[0] // 128)
                self.samples[name].append(x[::step][: self.rows - kept].clone())
        return fn

    def run(self, block: torch.nn.Module, inputs: Any) -> None:
        handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in self.layers.items()]
        try:
            with torch.no_grad():
                for h, kw in zip(inputs.hidden, inputs.kwargs):
                    block(h, **kw)
        finally:
            for h in handles:
                h.remove()


def foldable_groups(transform: BlockTransform, ctx: Any, which: str, rows: int) -> tuple[list[ScaleGroup], GroupInputs]:
    """The block's scale groups that ``transform`` can fold into (``which``: ``norms`` or ``all``), the
    others recorded as skipped with the reason, and their calibration inputs (one pass over the block)."""
    targets = {n[len(ctx.prefix):]: m for n, m in ctx.layers.items()}
    groups = []
    for g in scale_groups(ctx.model):
        if which == "norms" and isinstance(ctx.block.get_submodule(g.prev), torch.nn.Linear):
            continue
        why = fold_problem(ctx.block, g, targets, "this recipe")
        if why is None:
            groups.append(g)
        else:
            transform.records.append({"block": ctx.index, "prev": g.prev, "skipped": why})
    first = {ctx.prefix + g.linears[0]: ctx.block.get_submodule(g.linears[0]) for g in groups}
    cap = GroupInputs(first, rows)
    if groups:
        cap.run(ctx.block, ctx.inputs)
    missing = sorted(set(first) - set(cap.cmin))
    if missing:
        raise LowbitError(f"{transform.name}: no calibration input reached {missing[0]}")
    return groups, cap


@register_transform
@dataclass
class SmoothQuant(BlockTransform):
    """Options: ``alpha`` (float in [0, 1], or ``"search"``), ``groups`` (``norms``: the norm-fed
    groups, as in the paper and llm-compressor; ``all``: also linear-fed ones such as up -> down),
    ``sample_rows`` (calibration rows kept per group for the search)."""

    name: ClassVar[str] = "smoothquant"
    alpha: float | Literal["search"] = bounded(0.5, ge=0, le=1)
    groups: Literal["norms", "all"] = "norms"
    sample_rows: int = bounded(1024, ge=1)

    @torch.no_grad()
    def apply_block(self, ctx: Any) -> None:
        groups, cap = foldable_groups(self, ctx, self.groups, self.sample_rows)
        absmax = cap.absmax
        for g in groups:
            key = ctx.prefix + g.linears[0]
            lins = [ctx.block.get_submodule(n) for n in g.linears]
            w_max = torch.stack([m.weight.detach().abs().amax(0).float() for m in lins]).amax(0)
            x_max = absmax[key]
            alpha, err = self._choose(x_max, w_max, torch.cat(cap.samples[key]), lins, ctx.methods[key])
            s = smoothing_scales(x_max, w_max, alpha)
            fold_scales(ctx.block.get_submodule(g.prev), lins, s)
            self.records.append({"block": ctx.index, "prev": g.prev, "linears": list(g.linears), "alpha": alpha,
                                 "error": err, "max_x_before": float(x_max.max()),
                                 "max_x_after": float((x_max / s).max())})

    def _choose(self, x_max: torch.Tensor, w_max: torch.Tensor, x: torch.Tensor, lins: list[torch.nn.Module],
                method: Any) -> tuple[float, float | None]:
        if self.alpha != "search":
            return float(self.alpha), None
        scorer = SmoothingScorer(x, [m.weight.detach() for m in lins], method.spec, method.activations)
        scored = [(scorer.error(smoothing_scales(x_max, w_max, a)), a) for a in ALPHA_GRID]
        err, alpha = min(scored)
        return alpha, err
