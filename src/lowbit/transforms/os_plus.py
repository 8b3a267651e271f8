"""Outlier Suppression+ (Wei et al., 2023): channel-wise shifting and scaling of activations.

Per layer group (the linears fed by one op), each input channel ``j`` is shifted by the centre of
its calibration range, ``z_j = (max_j + min_j) / 2`` (asymmetric channels become symmetric), and
scaled down by ``s_j = max(1, max_j(|x_j - z_j|) / t)``, so no channel's range exceeds ``t``.  The
scale is folded like SmoothQuant's (feeding op divided, weight columns multiplied); the shift is
taken off in front of the input quantizer and added back after it, which a deployed kernel does
with the bias ``W s z``.  ``t`` is searched per group on a grid of fractions of the largest channel
range, by the output error of the group's linears under the formats they will be quantized with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lowbit.fields import bounded
from lowbit.models.folding import fold_scales
from lowbit.transforms.base import BlockTransform, register_transform
from lowbit.transforms.smoothquant import SmoothingScorer, foldable_groups

FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05)


def os_plus_params(cmin: torch.Tensor, cmax: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift z, scale s)`` per channel for the calibration range ``[cmin, cmax]`` and threshold ``t``."""
    z = (cmax + cmin) / 2
    s = ((cmax - cmin) / 2 / t).clamp(min=1.0)
    return z, s


@register_transform
@dataclass
class OSPlus(BlockTransform):
    """Options: ``shift`` (channel shifting on/off), ``groups`` (``norms`` or ``all``), ``sample_rows``."""

    name: ClassVar[str] = "os_plus"
    shift: bool = True
    groups: Literal["norms", "all"] = "all"
    sample_rows: int = bounded(1024, ge=1)
    _shifts: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # by full layer name

    def input_quantizer(self, name: str, quantizer: Any) -> Any:
        """Take each channel's shift off in front of the quantizer (and add it back after)."""
        if quantizer is not None and name in self._shifts:
            quantizer.shift = self._shifts[name]
        return quantizer

    @torch.no_grad()
    def apply_block(self, ctx: Any) -> None:
        groups, cap = foldable_groups(self, ctx, self.groups, self.sample_rows)
        for g in groups:
            key = ctx.prefix + g.linears[0]
            lins = [ctx.block.get_submodule(n) for n in g.linears]
            cmin, cmax = cap.cmin[key], cap.cmax[key]
            if not self.shift:
                cmin, cmax = -torch.maximum(cmin.abs(), cmax.abs()), torch.maximum(cmin.abs(), cmax.abs())
            method = ctx.methods[key]
            scorer = SmoothingScorer(torch.cat(cap.samples[key]), [m.weight.detach() for m in lins], method.spec,
                                     method.activations)
            top = float(((cmax - cmin) / 2).max())
            scored = []
            for f in FRACTIONS:
                z, s = os_plus_params(cmin, cmax, top * f)
                scored.append((scorer.error(s, z / s), f))
            err, f = min(scored)
            z, s = os_plus_params(cmin, cmax, top * f)
            fold_scales(ctx.block.get_submodule(g.prev), lins, s)
            for n in g.linears:
                self._shifts[ctx.prefix + n] = (z / s).float()
            self.records.append({"block": ctx.index, "prev": g.prev, "linears": list(g.linears), "threshold": top * f,
                                 "fraction": f, "error": err, "scaled_channels": int((s > 1).sum())})
