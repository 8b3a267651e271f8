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
from typing import ClassVar

import torch

from lowbit.activations.quantizer import ActQuantizer, SplitActQuantizer
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.solvers.affine import AffineColumns, Segment, check_int_spec, group_width
from lowbit.solvers.hessian import prepare, solve
from lowbit.solvers.storage import CodeBlock, bits_per_weight
from lowbit.spec import QuantSpec

OUTLIER_WEIGHT = QuantSpec(type="int", bits=8, granularity="channel")
OUTLIER_INPUT = QuantSpec(type="int", bits=8, granularity="token", dynamic=True)
DEFAULT_INPUT = QuantSpec(type="int", bits=4, granularity="group", group_size=64, dynamic=True, padding="pad")


def atom_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, outliers: torch.Tensor,
              damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """GPTQ over ``[normal columns | outlier columns]``: ``spec`` groups on the first part, int8 per row on
    the outliers; returns the dequantized weight in the original column order."""
    check_int_spec(spec, "Atom", ("group", "channel"))
    w, h = prepare(weight, hessian)
    cols = w.shape[1]
    is_out = torch.zeros(cols, dtype=torch.bool, device=w.device)
    is_out[outliers.long()] = True
    perm = torch.cat([torch.nonzero(~is_out).flatten(), torch.nonzero(is_out).flatten()])
    n_normal = cols - int(is_out.sum())
    segments = [Segment(spec, n_normal, group_width(spec, n_normal))]
    if n_normal < cols:
        segments.append(Segment(OUTLIER_WEIGHT, cols - n_normal, cols - n_normal))
    return solve(w, h, AffineColumns(perm, segments), perm, damp, block_size).weight


def atom_bits(rows: int, cols: int, n_outliers: int, spec: QuantSpec) -> float:
    """Exact stored bits per weight: ``spec`` codes and group parameters, 8-bit outliers with an fp32 scale per row."""
    n_normal = cols - n_outliers
    groups = -(-n_normal // spec.group_size) if spec.granularity == "group" else 1
    blocks = [CodeBlock.of_spec(rows * n_normal, rows * groups, spec)]
    if n_outliers:
        blocks.append(CodeBlock.of_spec(rows * n_outliers, rows, OUTLIER_WEIGHT))
    return bits_per_weight(rows * cols, blocks)


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
        return LayerResult(weight=wq.to(w.dtype), bits_per_weight=atom_bits(*w.shape, self.outliers, self.spec),
                           artifacts={"atom_outliers": idx})
