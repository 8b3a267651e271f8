"""Low-rank factorization of each target linear (``lowbit.core.lowrank``): plain truncated SVD, ASVD (input
channels scaled by their mean activation magnitude) or SVD-LLM (whitened by the calibration Gram matrix, the
default: it minimises each layer's output error).  The rank is the largest whose two factors hold at most
``fraction`` of the layer's parameters, or the smallest keeping ``energy`` of the (whitened) spectrum::

    methods:
      - {method: lowrank, ignore: [lm_head], options: {fraction: 0.8, whiten: svd-llm}}

A final step: the weight becomes the product ``A @ B`` in full precision while the pipeline runs, and the
layer a ``LowRankLinear`` (``lowbit.lowrank_layers``: two linears, ``r (in + out)`` values, the count the report
gives) once it is done; checkpoints hold the two factors.  Nothing may round the layer afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lowbit.core.lowrank import asvd_factors, svd_factors, svd_llm_factors
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.lowrank_layers import FACTORS
from lowbit.methods.base import LayerStats, PreparedLayer, WeightMethod, register_method
from lowbit.methods.statistics import AbsMagnitude, Hessian, InputStatistic


@register_method
@dataclass
class LowRank(WeightMethod):
    """Replace each weight by a low-rank product (module docstring); the spec is not used."""

    fraction: float = bounded(0.8, gt=0.0, lt=1.0)  # parameter budget of the two factors, share of the layer's
    energy: float | None = bounded(None, gt=0.0, le=1.0)  # instead: share of the squared singular values kept
    whiten: Literal["none", "asvd", "svd-llm"] = "svd-llm"
    alpha: float = bounded(0.5, gt=0.0, le=1.0)  # ASVD's exponent on the activation magnitudes

    name = "lowrank"
    accepts_activations: ClassVar[bool] = False
    factorizes: ClassVar[bool] = True

    def rounds(self) -> bool:
        return False

    def statistics(self, name: str, layer: torch.nn.Module) -> list[InputStatistic]:
        return {"none": [], "asvd": [AbsMagnitude()], "svd-llm": [Hessian()]}[self.whiten]

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        self.linear_weight(name, layer)

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        w = self.linear_weight(name, layer).data
        budget = {"fraction": None if self.energy is not None else self.fraction, "energy": self.energy}
        how = self.whiten
        if self.whiten == "svd-llm" and stats.hessian is not None:
            f = svd_llm_factors(w.float(), stats.hessian, **budget)
        elif self.whiten == "asvd" and stats.act_absmean is not None:
            f = asvd_factors(w.float(), stats.act_absmean, self.alpha, **budget)
        elif self.whiten == "none" or stats.nsamples == 0:
            f = svd_factors(w.float(), **budget)
            how = "svd" if self.whiten == "none" else "svd; no calibration tokens"
        else:
            raise LowbitError(f"lowrank ({self.whiten}) needs calibration inputs for {name}, but none reached it")
        w.copy_(f.product().to(w.dtype))
        setattr(layer, FACTORS, (f.a.to(w.dtype), f.b.to(w.dtype)))  # swapped for a LowRankLinear after the pipeline
        stored = f.rank * (w.shape[0] + w.shape[1])
        note = f"rank {f.rank} ({how}), {100 * stored / w.numel():.1f}% of the parameters"
        return PreparedLayer(note=note, stored_params=stored)
