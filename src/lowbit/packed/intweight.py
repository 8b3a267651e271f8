"""``IntWeight``: the one integer form every exporter and packed module consumes.

Whatever a method produced (RTN/AWQ ``IntQuantized``, GPTQ/OWQ codes + scales + zeros +
``g_idx``), the layer's weight is written as signed codes ``q`` in ``[-2^(b-1), 2^(b-1))`` with
``W = scale[:, g] * (q - zero[:, g])``, ``g = g_idx[col]`` (``col // group_size`` when ``g_idx`` is
None), the convention of compressed-tensors.  Unsigned codes (asymmetric specs) shift by
``2^(b-1)`` together with their zero points, so the product is unchanged.  Layers whose weights
are not of this form (float formats, codebooks, fractional zero points, fp16 outlier columns)
raise a ``LowbitError`` saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.affine import IntQuantized
from lowbit.errors import LowbitError
from lowbit.quantized_layers import quantized_weight
from lowbit.spec import QuantSpec


def expand_groups(p: torch.Tensor, group_size: int | None, g_idx: torch.Tensor | None, cols: int) -> torch.Tensor:
    """Per-group parameters (out, n_groups) -> per-column (out, cols)."""
    if g_idx is not None:
        return p[:, g_idx.long()]
    if group_size is None:
        return p.expand(-1, cols)
    return p.repeat_interleave(group_size, dim=1)[:, :cols]


@dataclass
class IntWeight:
    """A linear weight as signed integer codes with per-group scales (and zero points)."""

    codes: torch.Tensor  # (out, in) int8, signed
    scale: torch.Tensor  # (out, n_groups)
    zero: torch.Tensor | None  # (out, n_groups) int8 signed; None when symmetric (zero 0)
    bits: int
    group_size: int | None  # None: one group per output row (channel strategy)
    g_idx: torch.Tensor | None = None  # (in,) int32 group of each column, when not col // group_size

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * (q - zero)`` per column group, as ``dtype``."""
        cols = self.codes.shape[1]
        q = self.codes.float()
        if self.zero is not None:
            q = q - expand_groups(self.zero.float(), self.group_size, self.g_idx, cols)
        return (q * expand_groups(self.scale.float(), self.group_size, self.g_idx, cols)).to(dtype)

    def storage_bits(self) -> int:
        """Bits of the packed form: codes, scales at their dtype, zero points at ``bits``, g_idx int32."""
        total = self.codes.numel() * self.bits + self.scale.numel() * self.scale.element_size() * 8
        if self.zero is not None:
            total += self.zero.numel() * self.bits
        if self.g_idx is not None:
            total += self.g_idx.numel() * 32
        return total


def _signed(codes: torch.Tensor, zero: torch.Tensor, bits: int, signed: bool, symmetric: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and zero points in the signed convention (zero None for a zero that is 0 everywhere)."""
    z = zero.float()
    if not bool(torch.equal(z, torch.round(z))):
        raise LowbitError("zero points are fractional (HQQ / SpQR style); integer formats need integer zero points")
    q = codes.to(torch.int16)
    if not signed:
        half = 1 << (bits - 1)
        q, z = q - half, z - half
    if symmetric and bool((z == 0).all()):
        return q.to(torch.int8), None
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if bool((z < lo).any() or (z > hi).any()):
        raise LowbitError(f"zero points fall outside the {bits}-bit code range [{lo}, {hi}]")
    return q.to(torch.int8), z.to(torch.int8)


def int_weight_from_quantized(qt: IntQuantized) -> IntWeight:
    lay = qt.layout
    if len(lay.shape) != 2 or lay.kind not in ("group", "channel", "tensor"):
        raise LowbitError(f"{lay.kind} granularity has no packed linear form; use group or channel quantization")
    if lay.kind == "group" and lay.padded_cols != lay.cols:
        raise LowbitError(f"input width {lay.cols} is not a multiple of group size {lay.group_size}")
    rows = lay.rows
    scale = qt.scale.reshape(rows, -1) if lay.kind != "tensor" else qt.scale.reshape(1, 1).expand(rows, 1)
    zero = qt.zero.reshape(rows, -1) if lay.kind != "tensor" else qt.zero.reshape(1, 1).expand(rows, 1)
    codes, z = _signed(qt.q, zero, qt.bits, qt.signed, qt.symmetric)
    return IntWeight(codes, scale.contiguous(), z, qt.bits, lay.group_size if lay.kind == "group" else None)


OUTLIERS_REFUSAL = ("the layer keeps full-precision outliers or quantized statistics (OWQ / SpQR); "
                    "integer group formats cannot hold them")


def int_weight_from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
                          spec: QuantSpec) -> IntWeight:
    """The ``IntWeight`` of GPTQ-family results: (out, in) codes, (out, n_groups) scales and zeros and
    each column's group ``g_idx`` (kept only when it is not ``col // group_size``)."""
    q, z = _signed(codes, zero, spec.bits, spec.signed, spec.symmetric)
    cols = q.shape[1]
    gs = spec.group_size if spec.granularity == "group" else None
    g = g_idx.to(torch.int32)
    natural = torch.arange(cols, device=g.device) // gs if gs else torch.zeros_like(g)
    keep = None if torch.equal(g.long(), natural.long()) else g
    return IntWeight(q, scale.contiguous(), z, spec.bits, gs, keep)


def int_weight_of(layer: torch.nn.Module) -> IntWeight:
    """The ``IntWeight`` of a layer quantized by lowbit, by the type of its stored form (``LowbitError``
    saying why when it has none)."""
    qw = quantized_weight(layer)
    if qw is None:
        raise LowbitError("this layer was not quantized by lowbit (no codes to pack)")
    if qw.int_refusal:
        raise LowbitError(qw.int_refusal)
    form = qw.form
    if isinstance(form, IntWeight):
        return form
    if isinstance(form, IntQuantized):
        return int_weight_from_quantized(form)
    if qw.spec is not None and qw.spec.type != "int":
        raise LowbitError(f"{qw.spec.type} weights are not integer codes; choose a float or codebook format")
    raise LowbitError(f"{qw.method} weights have no integer-code form ({type(form).__name__})")
