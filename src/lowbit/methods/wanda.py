"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, weight magnitude times the L2 norm of its
input channel over the calibration tokens, comparing weights within each output row (the paper's
comparison group); with ``pattern: "N:M"``, N of every M consecutive input weights of a row are pruned
instead (2:4, 4:8); ``owl: true`` spreads the sparsity over blocks by their outliers (``methods.pruning``).
No weight update: a non-rounding step whose mask the steps after it keep::

    methods:
      - {method: wanda, options: {sparsity: 0.5}}
      - {method: gptq, spec: W4_G64}

It declares its own statistic (``ChannelNorm``): the pipeline feeds it without knowing what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.methods.base import LayerStats, PreparedLayer, WeightMethod, register_method
from lowbit.methods.pruning import Pruner, wanda_scores
from lowbit.methods.statistics import ChannelNorm, InputStatistic


@register_method
@dataclass
class Wanda(Pruner):
    """Prune by weight magnitude times input-channel norm (module docstring); the spec is not used."""

    name = "wanda"

    def statistics(self, name: str, layer: torch.nn.Module) -> list[InputStatistic]:
        return [ChannelNorm()]

    def fallback(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> WeightMethod | None:
        return None  # never asked: a pruning step does not round

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        w = self.linear_weight(name, layer).data
        norm = stats.extra.get(ChannelNorm.key)
        if norm is None:
            raise LowbitError(f"wanda needs calibration inputs for {name}, but none reached it")
        mask = self.select(name, wanda_scores(w, norm), True, stats.mask)
        w.masked_fill_(mask, 0.0)
        return PreparedLayer(mask=mask, note=self.note(mask, self.pattern or "per row"))
