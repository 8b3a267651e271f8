"""QoQ (QServe, Lin et al., 2024): W4A8 with progressive group quantization.

Weights are first quantized per output row to int8 with the protective range ``[-119, 119]``
(``s1 = absmax / 119``, fp16), then each group of int8 values is quantized to unsigned 4 bits with
an integer scale ``s2`` (uint8) and integer zero point: ``W = s1 * s2 * (q4 - z)``.  Because the
second level is integer, ``s2 * (q4 - z)`` is exactly an int8 value and the W4A8 GEMM runs in int8
after a cheap int4 -> int8 expansion; the protective range keeps that value inside int8.
Inputs are int8 per token (the recipe's activation spec, ``A8_TOKEN``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.spec import QuantSpec

PROTECTIVE = 119


def progressive_quantize(w: torch.Tensor, group_size: int, bits: int = 4) -> dict[str, torch.Tensor]:
    """Two-level quantization of ``w`` (out, in): returns ``q4`` (uint8 codes), ``s2``/``z`` (int, per
    group), ``s1`` (fp16 per row), ``q8`` (the int8 values ``s2 * (q4 - z)``) and ``weight`` (dequantized)."""
    rows, cols = w.shape
    qmax = (1 << bits) - 1
    s1 = (w.abs().amax(dim=1, keepdim=True) / PROTECTIVE).to(torch.float16).float()
    s1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
    q8 = torch.clamp(torch.round(w / s1), -PROTECTIVE, PROTECTIVE)
    g = q8.reshape(rows, cols // group_size, group_size)
    lo, hi = g.amin(dim=2, keepdim=True).clamp(max=0), g.amax(dim=2, keepdim=True).clamp(min=0)
    s2 = torch.ceil((hi - lo) / qmax).clamp(min=1)  # integer scale; ceil keeps the range covered
    z = torch.clamp(torch.round(-lo / s2), 0, qmax)
    q4 = torch.clamp(torch.round(g / s2) + z, 0, qmax)
    q8_hat = (s2 * (q4 - z)).reshape(rows, cols)
    return {"q4": q4.reshape(rows, cols).to(torch.uint8), "s2": s2.squeeze(2).to(torch.uint8),
            "z": z.squeeze(2).to(torch.uint8), "s1": s1.squeeze(1).to(torch.float16), "q8": q8_hat,
            "weight": q8_hat * s1}


@register_method
@dataclass
class QoQ(WeightMethod):
    """Progressive group quantization of the weights (``spec``: 4-bit groups, e.g. 128 or 64)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(type="int", bits=4, granularity="group", group_size=128,
                                                              symmetric=False, signed=False))
    name: ClassVar[str] = "qoq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.type != "int" or self.spec.granularity != "group" or self.spec.bits > 4:
            raise ValueError("QoQ's second level is unsigned int groups of at most 4 bits (e.g. W4_G128)")

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = self.linear_weight(name, layer).data
        r = progressive_quantize(w.float(), self.spec.group_size, self.spec.bits)
        rows, cols = w.shape
        bits = rows * cols * self.spec.bits + r["s2"].numel() * 8 + r["z"].numel() * self.spec.bits + rows * 16
        return LayerResult(weight=r["weight"].to(w.dtype), bits_per_weight=bits / (rows * cols),
                           artifacts={"qoq": {k: r[k] for k in ("q4", "s2", "z", "s1")}})
