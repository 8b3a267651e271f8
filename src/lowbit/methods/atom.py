"""Atom (Zhao et al., 2024): W4A4 with mixed-precision outlier channels and fine-grained groups.

Per linear layer, the ``outliers`` input channels with the largest calibration activation energy
(the Hessian diagonal, ``sum x^2``) are reordered to the end and kept at 8 bits in both the weight
(per output row, symmetric) and the activation (per token); the other channels, in their original
order, use ``spec`` for the weight (int4 groups, quantized by GPTQ over the reordered matrix, the
outlier columns last so they absorb the error feedback) and ``activations`` for the inputs (int4
per token in groups, dynamic).  A partial last group (when the group size does not divide the
normal channels) is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.activations.quantizer import ActQuantizer, SplitActQuantizer
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.methods.gptq import _inverse_cholesky, _qparams, gptq_sweep, working_copies, zero_dead_columns
from lowbit.spec import SCALE_BITS, QuantSpec

OUTLIER_WEIGHT = QuantSpec(type="int", bits=8, granularity="channel")
OUTLIER_INPUT = QuantSpec(type="int", bits=8, granularity="token", dynamic=True)
DEFAULT_INPUT = QuantSpec(type="int", bits=4, granularity="group", group_size=64, dynamic=True, padding="pad")


def atom_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, outliers: torch.Tensor,
              damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """GPTQ over ``[normal columns | outlier columns]``: ``spec`` groups on the first part, int8 per row on
    the outliers; returns the dequantized weight in the original column order."""
    w, h = working_copies(weight, hessian, spec, "Atom", ("group", "channel"))
    cols = w.shape[1]
    is_out = torch.zeros(cols, dtype=torch.bool)
    is_out[outliers.long()] = True
    perm = torch.cat([torch.nonzero(~is_out).flatten(), torch.nonzero(is_out).flatten()])
    n_normal = int((~is_out).sum())
    zero_dead_columns(w, h)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, _ = _inverse_cholesky(h, damp)
    group = spec.group_size if spec.granularity == "group" else n_normal
    params: list[torch.Tensor] = []
    current: list[QuantSpec] = []

    def quantize_column(col: int, x: torch.Tensor, peek: Any) -> torch.Tensor:
        if col < n_normal and (col % group == 0):
            params[:] = _qparams(peek(min(group, n_normal - col)), spec)
            current[:] = [spec]
        elif col == n_normal:
            params[:] = _qparams(peek(cols - n_normal), OUTLIER_WEIGHT)
            current[:] = [OUTLIER_WEIGHT]
        s, z = params
        sp = current[0]
        return s * (torch.clamp(torch.round(x / s) + z, sp.qmin, sp.qmax) - z)

    gptq_sweep(w, hinv, quantize_column, block_size)
    return w[:, torch.argsort(perm)]


@register_method
@dataclass
class Atom(WeightMethod):
    """Options: ``outliers`` (channels kept at 8 bits per layer), ``damp``, ``block_size`` (GPTQ)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(type="int", bits=4, granularity="group", group_size=64,
                                                              symmetric=False, signed=False))
    outliers: int = bounded(32, ge=0)
    damp: float = bounded(0.01, gt=0)
    block_size: int = bounded(128, ge=1)

    name: ClassVar[str] = "atom"
    needs_hessian: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.type != "int" or self.spec.granularity not in ("group", "channel"):
            raise ValueError("Atom quantizes the regular channels to int groups (or channels)")
        self._outliers: dict[str, torch.Tensor] = {}
        self._width: dict[str, int] = {}

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        cols = self.linear_weight(name, layer).shape[1]
        if self.outliers >= cols:
            raise LowbitError(f"{name} has {cols} input channels; Atom's outliers={self.outliers} must be fewer")

    def input_quantizer(self, name: str) -> ActQuantizer | None:
        spec = self.activations or DEFAULT_INPUT
        if spec.granularity == "group":
            spec = spec.replace(padding="pad")  # the regular channels need not fill whole groups
        return SplitActQuantizer(spec, OUTLIER_INPUT, self._outliers[name], self._width[name])

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = self.linear_weight(name, layer).data
        h = self.require_hessian(name, stats)
        idx = torch.argsort(torch.diag(h), descending=True)[: self.outliers].sort().values
        self._outliers[name] = idx
        self._width[name] = w.shape[1]
        wq = atom_gptq(w, h, self.spec, idx, self.damp, self.block_size)
        rows, cols = w.shape
        n_normal = cols - self.outliers
        groups = -(-n_normal // self.spec.group_size) if self.spec.granularity == "group" else 1
        per_group = SCALE_BITS[self.spec.scale_dtype] + (0 if self.spec.symmetric else self.spec.bits)
        bits = rows * (n_normal * self.spec.bits + groups * per_group)
        if self.outliers:
            bits += rows * (self.outliers * 8 + 32)
        return LayerResult(weight=wq.to(w.dtype), bits_per_weight=bits / (rows * cols),
                           artifacts={"atom_outliers": idx})
