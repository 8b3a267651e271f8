"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, weight magnitude times the L2 norm of its
input channel over the calibration tokens, comparing weights within each output row (the paper's
comparison group); with ``pattern: "N:M"``, N of every M consecutive input weights of a row are pruned
instead (2:4, 4:8).  No weight update: a non-rounding step whose mask the steps after it keep::

    methods:
      - {method: wanda, options: {sparsity: 0.5}}
      - {method: gptq, spec: W4_G64}

It declares its own statistic (``ChannelNorm``): the pipeline feeds it without knowing what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.sparsity import lowest_n_of_m, lowest_per_row, parse_pattern
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.methods.base import LayerStats, PreparedLayer, WeightMethod, register_method
from lowbit.methods.statistics import ChannelNorm, InputStatistic


def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (fp32)."""
    return w.detach().abs().float() * input_norm.float().to(w.device).unsqueeze(0)


@register_method
@dataclass
class Wanda(WeightMethod):
    """Prune by weight magnitude times input-channel norm (module docstring); the spec is not used."""

    sparsity: float = bounded(0.5, ge=0.0, lt=1.0)
    pattern: str | None = None  # "N:M" semi-structured; sparsity is then N/M

    name = "wanda"
    accepts_activations = False
    prunes = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern is not None:
            parse_pattern(self.pattern)

    def rounds(self) -> bool:
        return False

    def keeps_mask(self) -> bool:
        return True  # an earlier mask is merged into this one

    def statistics(self, name: str, layer: torch.nn.Module) -> list[InputStatistic]:
        return [ChannelNorm()]

    def fallback(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> WeightMethod | None:
        return None  # never asked: a pruning step does not round

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        cols = self.linear_weight(name, layer).shape[1]
        if self.pattern is not None and cols % parse_pattern(self.pattern)[1]:
            raise LowbitError(f"{name} has {cols} input features, not a multiple of {self.pattern}'s M; "
                              "use another pattern or unstructured sparsity")

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        w = self.linear_weight(name, layer).data
        norm = stats.extra.get(ChannelNorm.key)
        if norm is None:
            raise LowbitError(f"wanda needs calibration inputs for {name}, but none reached it")
        score = wanda_scores(w, norm)
        if self.pattern is not None:
            mask = lowest_n_of_m(score, *parse_pattern(self.pattern))
        else:
            mask = lowest_per_row(score, self.sparsity)
        if stats.mask is not None:  # an earlier step's zeros stay zeros
            mask |= stats.mask
        w.masked_fill_(mask, 0.0)
        how = self.pattern or "per row"
        return PreparedLayer(mask=mask, note=f"{100 * mask.float().mean().item():.1f}% pruned (wanda, {how})")
