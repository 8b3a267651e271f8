"""Magnitude pruning (Han et al., 2015): zero the weights with the smallest ``|w|``, over the whole layer
(``scope: layer``), per output row (``scope: row``, Wanda's comparison group) or N of every M
(``pattern: "2:4"``); ``owl: true`` spreads the sparsity over blocks by their outliers (``methods.pruning``).

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
from lowbit.methods.base import LayerStats, PreparedLayer, register_method
from lowbit.methods.pruning import Pruner


def magnitude_mask(w: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """True at the ``round(sparsity * n)`` smallest ``|w|`` of the layer (or of each row); ties by position."""
    a = w.detach().abs().float()
    return lowest_per_row(a, sparsity) if scope == "row" else lowest_overall(a, sparsity)


@register_method
@dataclass
class Magnitude(Pruner):
    """Prune the smallest weights to zero (module docstring); the spec is not used."""

    scope: Literal["layer", "row"] = "layer"

    name = "magnitude"

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        w = self.linear_weight(name, layer).data
        mask = self.select(name, w.abs().float(), self.scope == "row", stats.mask)
        w.masked_fill_(mask, 0.0)
        return PreparedLayer(mask=mask, note=self.note(mask, self.pattern or self.scope))
