"""Unstructured magnitude pruning (Han et al., 2015): zero the ``sparsity`` fraction of a layer's weights with
the smallest ``|w|``, per layer (``scope: layer``) or per output row (``scope: row``, Wanda's comparison group).

A non-rounding step: the pruned weight stays in full precision and its mask travels to the steps after it,
which keep the zeros (RTN keeps them exactly; GPTQ freezes them in its sweep)::

    methods:
      - {method: magnitude, options: {sparsity: 0.5}}
      - {method: gptq, spec: W4_G64}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.core.sparsity import lowest_overall, lowest_per_row
from lowbit.fields import bounded
from lowbit.methods.base import LayerStats, PreparedLayer, WeightMethod, register_method


def magnitude_mask(w: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """True at the ``round(sparsity * n)`` smallest ``|w|`` of the layer (or of each row); ties by position."""
    a = w.detach().abs().float()
    return lowest_per_row(a, sparsity) if scope == "row" else lowest_overall(a, sparsity)


@register_method
@dataclass
class Magnitude(WeightMethod):
    """Prune the smallest weights to zero (module docstring); the spec is not used."""

    sparsity: float = bounded(0.5, ge=0.0, lt=1.0)
    scope: Literal["layer", "row"] = "layer"

    name = "magnitude"
    accepts_activations = False
    prunes = True

    def rounds(self) -> bool:
        return False

    def keeps_mask(self) -> bool:
        return True  # an earlier mask is merged into this one

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        self.linear_weight(name, layer)  # any 2-D weight: no groups to divide

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        w = self.linear_weight(name, layer).data
        mask = magnitude_mask(w, self.sparsity, self.scope)
        if stats.mask is not None:  # an earlier step's zeros stay zeros
            mask |= stats.mask
        w.masked_fill_(mask, 0.0)
        return PreparedLayer(mask=mask, note=f"{100 * mask.float().mean().item():.1f}% pruned (magnitude, {self.scope})")
