"""OliVe (Guo et al., ISCA 2023): outlier-victim pair quantization of weights and activations.

Weights: one scale per output row, searched for the least squared error of the pair encoding
(``lowbit.core.olive``); inputs (with an activation spec): one static scale per tensor, searched the
same way on calibration rows.  Outliers are kept at the same bit width by sacrificing their pair
partner, so storage is exactly ``bits`` per value plus the scales.  The codes have no
compressed-tensors form: checkpoints are written fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowbit.activations.quantizer import ActQuantizer, PairActQuantizer
from lowbit.core.olive import ovp_fake_quant, search_ovp_scale
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.spec import SCALE_BITS, QuantSpec

ROW_INT4 = QuantSpec(type="int", bits=4, granularity="channel", scale_dtype="float16")


@register_method
@dataclass
class OliVe(WeightMethod):
    """No options: the spec gives the weight bits (4 or 8, per channel), the activation spec the input bits."""

    spec: QuantSpec = field(default_factory=lambda: ROW_INT4)

    name: ClassVar[str] = "olive"

    def __post_init__(self) -> None:
        super().__post_init__()
        sp = self.spec
        if sp.type != "int" or sp.bits not in (4, 8) or sp.granularity != "channel" or not sp.symmetric:
            raise ValueError("OliVe quantizes weights to symmetric int4 or int8 with one scale per output row "
                             "(spec {type: int, bits: 4, granularity: channel})")
        act = self.activations
        if act is not None and (act.dynamic or act.type != "int" or act.bits not in (4, 8) or not act.symmetric):
            raise ValueError("OliVe's inputs take one static scale per tensor: use a static symmetric int4/int8 "
                             "activation spec such as A8_TENSOR")

    def input_quantizer(self, name: str) -> ActQuantizer | None:
        return None if self.activations is None else PairActQuantizer(self.activations)

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = self.linear_weight(name, layer).data
        scale = search_ovp_scale(w.float(), self.spec.bits, per_row=True)
        wq = ovp_fake_quant(w.float(), scale, self.spec.bits).to(w.dtype)
        bits = self.spec.bits + SCALE_BITS[self.spec.scale_dtype] / w.shape[1]
        return LayerResult(weight=wq, bits_per_weight=bits, artifacts={"ovp_scale": scale.reshape(-1)})
