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
from typing import Any

import torch

from lowbit.core.affine import IntQuantized
from lowbit.errors import LowbitError


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


def _from_int_quantized(qt: IntQuantized) -> IntWeight:
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


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether lowbit quantized this layer (in this process, or codes read back from disk)."""
    return getattr(layer, "lowbit_int_weight", None) is not None or getattr(layer, "lowbit_artifacts", None) is not None


def int_weight_of(layer: torch.nn.Module) -> IntWeight:
    """The ``IntWeight`` of a layer quantized by lowbit (``LowbitError`` if it has none)."""
    known = getattr(layer, "lowbit_int_weight", None)
    if known is not None:
        return known
    art: dict[str, Any] | None = getattr(layer, "lowbit_artifacts", None)
    spec = getattr(layer, "lowbit_spec", None)
    if art is None or spec is None:
        raise LowbitError("this layer was not quantized by lowbit (no codes to pack)")
    if art.get("fp_idx") is not None or "scale_codes" in art:
        raise LowbitError("the layer keeps full-precision outliers or quantized statistics (OWQ / SpQR); "
                          "integer group formats cannot hold them")
    if spec.type != "int":
        raise LowbitError(f"{spec.type} weights are not integer codes; choose a float or codebook format")
    if art.get("zero_dtype") == "float16":
        raise LowbitError("zero points are fractional (HQQ); integer formats need integer zero points")
    if "codes" in art and "g_idx" in art:  # GPTQ family: (out, in) codes, (out, n_groups) params
        codes, z = _signed(art["codes"], art["zero"], spec.bits, spec.signed, spec.symmetric)
        cols = codes.shape[1]
        gs = spec.group_size if spec.granularity == "group" else None
        g_idx = art["g_idx"].to(torch.int32)
        natural = torch.arange(cols, device=g_idx.device) // gs if gs else torch.zeros_like(g_idx)
        keep = None if torch.equal(g_idx.long(), natural.long()) else g_idx
        return IntWeight(codes, art["scale"].contiguous(), z, spec.bits, gs, keep)
    qt = art.get("quantized")
    if isinstance(qt, IntQuantized):
        return _from_int_quantized(qt)
    raise LowbitError(f"no integer codes found for this layer (artifacts: {', '.join(sorted(art))})")
