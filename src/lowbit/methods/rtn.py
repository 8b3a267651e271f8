"""RTN: round-to-nearest with any QuantSpec; the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.quant import dequantize, quantize, storage_bits
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method


@register_method
@dataclass
class RTN(WeightMethod):
    """Quantize each weight to the nearest grid point of ``spec`` (no calibration data)."""

    name = "rtn"

    def keeps_mask(self) -> bool:
        return self.spec.type in ("int", "float")  # 0 is a grid point of every int (integer zero point) and float format

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = layer.weight.data
        qt = quantize(w.float(), self.spec)
        return LayerResult(
            weight=dequantize(qt).to(w.dtype),
            bits_per_weight=storage_bits(qt, self.spec.scale_dtype),
            form=qt,
            artifacts={"quantized": qt},
        )
