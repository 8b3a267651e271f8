"""ZeroQuant-FP (Wu et al., 2023): floating-point W4A8 / W8A8 with power-of-two scales and LoRC.

Weights are rounded to a float grid (FP4 E2M1 or FP8 E4M3, the ``spec``; ``pow2_scale: true`` restricts
scales to powers of two so the FP4 -> FP8 conversion in the kernel is a bit shift), then LoRC
(low-rank compensation, from ZeroQuant-V2) adds the best rank-``lorc_rank`` approximation of the
quantization error ``W - Q(W)`` as two fp16 factors: ``W ~ Q(W) + U_r S_r V_r^T`` (``lowbit.methods.lorc``, applied
by the pipeline after rounding; this step collects no Hessian, so plain SVD as in the paper).  Inputs use the
recipe's activation spec (FP8 E4M3 per token in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.core.quant import dequantize, quantize, storage_bits
from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.spec import QuantSpec


@register_method
@dataclass
class ZeroQuantFP(WeightMethod):
    """Options: ``lorc_rank`` (the LoRC rank, default 8; 0 turns it off)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(type="float", fmt="e2m1", bits=4, granularity="group",
                                                              group_size=64, pow2_scale=True))
    lorc_rank: int = bounded(8, ge=0)  # the paper's LoRC (lowbit.methods.lorc; 0: none), the pipeline adds it
    name: ClassVar[str] = "zeroquant_fp"

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = self.linear_weight(name, layer).data
        qt = quantize(w.float(), self.spec)
        wq = dequantize(qt).float()
        bits = storage_bits(qt, self.spec.scale_dtype)
        return LayerResult(weight=wq.to(w.dtype), bits_per_weight=bits, artifacts={"quantized": qt}, form=qt)
