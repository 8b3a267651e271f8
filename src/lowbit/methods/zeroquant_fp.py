"""ZeroQuant-FP (Wu et al., 2023): floating-point W4A8 / W8A8 with power-of-two scales and LoRC.

Weights are rounded to a float grid (FP4 E2M1 or FP8 E4M3, the ``spec``; ``pow2_scale: true`` restricts
scales to powers of two so the FP4 -> FP8 conversion in the kernel is a bit shift), then LoRC
(low-rank compensation, from ZeroQuant-V2) adds the best rank-``rank`` approximation of the
quantization error ``W - Q(W)`` as two fp16 factors: ``W ~ Q(W) + U_r S_r V_r^T``.  Inputs use the
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


def lorc(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 factors ``(U_r S_r^1/2, S_r^1/2 V_r^T)`` of the best rank-``rank`` approximation of ``error``."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float16), (root.view(-1, 1) * vh[:rank]).to(torch.float16)


@register_method
@dataclass
class ZeroQuantFP(WeightMethod):
    """Options: ``rank`` (LoRC rank; 0 turns it off)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(type="float", fmt="e2m1", bits=4, granularity="group",
                                                              group_size=64, pow2_scale=True))
    rank: int = bounded(8, ge=0)  # 0: no LoRC
    name: ClassVar[str] = "zeroquant_fp"

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = self.linear_weight(name, layer).data
        qt = quantize(w.float(), self.spec)
        wq = dequantize(qt).float()
        rows, cols = w.shape
        bits = storage_bits(qt, self.spec.scale_dtype) * rows * cols
        art: dict = {"quantized": qt}
        rank = min(self.rank, rows, cols)
        if rank:
            a, b = lorc(w.float() - wq, rank)
            wq = wq + a.float() @ b.float()
            bits += (a.numel() + b.numel()) * 16
            art["lorc"] = (a, b)
        # with LoRC factors the weight is no longer the float grid's: only fake-quant holds it
        return LayerResult(weight=wq.to(w.dtype), bits_per_weight=bits / (rows * cols), artifacts=art,
                           form=None if rank else qt,
                           extra_params=(rows + cols) * rank)
