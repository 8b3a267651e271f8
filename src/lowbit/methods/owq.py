"""OWQ (Lee et al., 2024): keep a few weak input columns in fp16, quantize the rest with GPTQ.

An activation outlier on input channel ``j`` makes every weight of column ``j`` sensitive.  OWQ
scores each column by ``lambda_j * ||dW_{:,j}||^2`` with ``lambda = diag(H)`` (``H = 2/n X^T X``)
and ``dW = W - Q(W)`` the round-to-nearest error under the spec, keeps the top ``k`` columns
("weak columns") in fp16 and quantizes the other ``in - k`` columns with GPTQ.  As in the
reference code, the weak columns are moved to the *end* of the GPTQ sweep: they are never
quantized but receive GPTQ's error compensation from every quantized column, and their final
(compensated) values are what is stored in fp16.  Group parameters are fitted on the quantized
columns only: groups of ``group_size`` consecutive columns of the sweep order (the original order
without the weak columns; with ``act_order``, descending sensitivity, as in the reference), so the
last group may be partial.

Storage (``bits_per_weight``, exact): ``bits`` per code of the ``in - k`` quantized columns, one
scale (``spec.scale_dtype`` width) and, for asymmetric specs, a ``bits``-bit zero per row and
group, and per weak column ``out`` fp16 values plus a 32-bit column index.  Without act-order the
group of every column follows from the weak-column index list, so nothing else is stored; with
act-order the column permutation is not counted (as for GPTQ's act-order ``g_idx``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.quant import dequantize, quantize
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.packed.intweight import OUTLIERS_REFUSAL, int_weight_from_codes
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.solvers.affine import AffineColumns, Segment, check_int_spec, group_width
from lowbit.solvers.hessian import prepare, solve
from lowbit.solvers.storage import FP16_BITS, CodeBlock, bits_per_weight
from lowbit.spec import QuantSpec

FP_BITS = FP16_BITS  # storage of a weak-column weight
INDEX_BITS = 32  # storage of a weak column's index


@dataclass
class OWQResult:
    """Dequantized weight plus its parts, all in original column order."""

    weight: torch.Tensor  # (out, in) float32: quantized columns dequantized, weak columns fp16 values
    codes: torch.Tensor  # (out, in) uint8 / int8 (int32 beyond 8 bits); 0 in the weak columns
    scale: torch.Tensor  # (out, n_groups)
    zero: torch.Tensor  # (out, n_groups)
    g_idx: torch.Tensor  # (in,) int32 group of each column, -1 for weak columns
    fp_idx: torch.Tensor  # (k,) int64 weak columns, most sensitive first
    fp_weight: torch.Tensor  # (out, k) float16 stored weak columns
    sensitivity: torch.Tensor  # (in,) lambda_j * ||dW_j||^2
    damp_used: float


def column_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """OWQ's ``lambda_j * ||W_{:,j} - Q(W)_{:,j}||^2`` with ``lambda = diag(H)`` and ``Q`` = RTN under ``spec``."""
    w = weight.detach().float()
    rtn_spec = spec.replace(padding="pad") if spec.granularity == "group" else spec
    dw = w - dequantize(quantize(w, rtn_spec)).float()
    return torch.diag(hessian.detach().float()).clamp(min=0) * dw.pow(2).sum(0)


def sweep_order(sens: torch.Tensor, k: int, act_order: bool) -> torch.Tensor:
    """Quantized columns (original order, or by descending sensitivity) then the ``k`` weak ones, most sensitive first."""
    order = torch.argsort(sens, descending=True)
    if act_order:
        return torch.cat([order[k:], order[:k]])
    keep = torch.ones(sens.numel(), dtype=torch.bool, device=sens.device)
    keep[order[:k]] = False
    return torch.cat([torch.arange(sens.numel(), device=sens.device)[keep], order[:k]])


def owq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    n_fp_cols: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> OWQResult:
    """Run OWQ on one weight ``(out, in)`` with Hessian ``(in, in)``; pure tensor math."""
    check_int_spec(spec, "OWQ")
    cols, k = weight.shape[1], int(n_fp_cols)
    if not 0 <= k < cols:
        raise LowbitError(f"OWQ needs 0 <= n_fp_cols < in_features ({cols}), got {k}")
    sens = column_sensitivity(weight, hessian, spec)
    perm = sweep_order(sens, k, act_order)
    w, h = prepare(weight, hessian)
    n_q = cols - k
    fmt = AffineColumns(perm, [Segment(spec, n_q, group_width(spec, n_q))])
    sol = solve(w, h, fmt, perm, damp, block_size, keep_last=k)
    fp_idx = perm[n_q:]
    fp_weight = sol.weight[:, fp_idx].to(torch.float16)
    sol.weight[:, fp_idx] = fp_weight.float()
    parts = fmt.result()
    return OWQResult(sol.weight, parts.codes, parts.scale, parts.zero, parts.g_idx, fp_idx, fp_weight, sens, sol.damp)


def owq_bits(rows: int, cols: int, n_fp_cols: int, n_groups: int, spec: QuantSpec) -> float:
    """Exact stored bits per weight of an OWQ layer (see the module docstring)."""
    codes = CodeBlock.of_spec(rows * (cols - n_fp_cols), rows * n_groups, spec)
    return bits_per_weight(rows * cols, [codes], n_fp_cols * rows, FP_BITS, n_fp_cols * INDEX_BITS)


@register_method
@dataclass
class OWQ(WeightMethod):
    """GPTQ with the ``n_fp_cols`` (or ``fp_ratio`` x in_features) most sensitive input columns in fp16.

    ``fp_ratio=0.0035`` keeps ~0.35% of the columns (2 of 576, 5 of 1536): about 0.045 extra
    bits per weight at 3 bits, in the paper's 0.01-0.05 range.  A positive ratio keeps at least one
    column.
    """

    n_fp_cols: int | None = bounded(None, ge=0)
    fp_ratio: float = bounded(0.0035, ge=0, lt=1)
    damp: float = bounded(0.01, gt=0)
    block_size: int = bounded(128, ge=1)
    act_order: bool = False

    name = "owq"
    needs_hessian = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.type != "int" or self.spec.granularity not in ("channel", "group", "tensor"):
            raise LowbitError("owq quantizes to int specs with channel, group or tensor granularity")

    def fp_columns(self, cols: int) -> int:
        """Number of fp16 columns for a layer with ``cols`` input features."""
        if self.n_fp_cols is not None:
            return self.n_fp_cols
        return max(1, round(self.fp_ratio * cols)) if self.fp_ratio > 0 else 0

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        # groups run over the quantized columns only, so a partial last group is normal: no divisibility check
        weight = self.linear_weight(name, layer)
        if self.fp_columns(weight.shape[1]) >= weight.shape[1]:
            raise LowbitError(f"owq: {self.fp_columns(weight.shape[1])} fp16 columns leave nothing to quantize in {name}")

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        self.require_hessian(name, stats)
        w = layer.weight.data
        rows, cols = w.shape
        k = self.fp_columns(cols)
        res = owq_quantize(w, stats.hessian, self.spec, k, self.damp, self.block_size, self.act_order)
        return LayerResult(
            weight=res.weight.to(w.dtype),
            bits_per_weight=owq_bits(rows, cols, k, res.scale.shape[1], self.spec),
            form=int_weight_from_codes(res.codes, res.scale, res.zero, res.g_idx, self.spec),
            artifacts={"codes": res.codes, "scale": res.scale, "zero": res.zero, "g_idx": res.g_idx,
                       "fp_idx": res.fp_idx, "fp_weight": res.fp_weight, "damp": res.damp_used},
            int_refusal=None if res.fp_idx is None else OUTLIERS_REFUSAL,
            extra_params=k * rows,
        )


__all__ = ["OWQ", "OWQResult", "owq_quantize", "owq_bits", "column_sensitivity"]
