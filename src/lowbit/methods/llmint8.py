"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 with mixed-precision outlier decomposition.

Weights: int8, one absmax scale per output row (data-free).  Inputs: one absmax scale per token,
except the feature columns holding a value of magnitude >= ``threshold`` (6.0 in the paper) in
the current input, which are multiplied in full precision.  The outlier columns are found at run
time, so the layer's input quantizer is an ``OutlierActQuantizer``, not a static spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.activations.quantizer import ActQuantizer, OutlierActQuantizer
from lowbit.core.quant import dequantize, quantize, storage_bits
from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.spec import QuantSpec

ROW_INT8 = QuantSpec(type="int", bits=8, granularity="channel", scale_dtype="float16")
TOKEN_INT8 = QuantSpec(type="int", bits=8, granularity="token", dynamic=True)


@register_method
@dataclass
class LLMInt8(WeightMethod):
    """Option ``threshold``: input magnitude from which a feature column stays in full precision."""

    spec: QuantSpec = field(default_factory=lambda: ROW_INT8)
    threshold: float = bounded(6.0, gt=0, le=math.inf)  # inf: no column kept in full precision

    name: ClassVar[str] = "llmint8"
    accepts_activations: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.type != "int" or self.spec.bits != 8 or self.spec.granularity != "channel":
            raise ValueError("LLM.int8() quantizes weights to int8 with one scale per output row (spec W8)")

    def input_quantizer(self, name: str) -> ActQuantizer | None:
        return OutlierActQuantizer(TOKEN_INT8, self.threshold)

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = self.linear_weight(name, layer).data
        qt = quantize(w.float(), self.spec)
        return LayerResult(weight=dequantize(qt).to(w.dtype), bits_per_weight=storage_bits(qt, self.spec.scale_dtype),
                           form=qt, artifacts={"quantized": qt})
