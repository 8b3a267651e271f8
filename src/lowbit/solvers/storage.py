"""Exact stored bits per weight: int code blocks with their scales / zeros, full-precision values, indices.

One count for every Hessian method: GPTQ (one block), Atom (a 4-bit block and an 8-bit outlier
block), OWQ (one block + fp16 columns with their indices), SpQR (the weight codes, a block of
``stat_bits`` statistics whose own fp16 scales and zeros are its groups, fp16 outliers in CSR).
Totals are summed as integers and divided once, so equal layouts give bit-equal floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from lowbit.spec import SCALE_BITS, QuantSpec

FP16_BITS = 16


@dataclass(frozen=True)
class CodeBlock:
    """``codes`` integer codes of ``bits`` bits sharing ``groups`` scales (and zero points when ``zero_bits``)."""

    codes: int
    bits: int
    groups: int = 0
    scale_bits: int = 32
    zero_bits: int = 0  # 0: symmetric grid, no stored zero point

    @classmethod
    def of_spec(cls, codes: int, groups: int, spec: QuantSpec) -> "CodeBlock":
        """Codes of an int ``spec``: scales at ``spec.scale_dtype`` width, ``bits``-bit zeros if asymmetric."""
        return cls(codes, spec.bits, groups, SCALE_BITS[spec.scale_dtype], 0 if spec.symmetric else spec.bits)

    @property
    def total(self) -> int:
        return self.codes * self.bits + self.groups * (self.scale_bits + self.zero_bits)


def bits_per_weight(numel: int, blocks: Iterable[CodeBlock], fp_values: int = 0, fp_bits: int = FP16_BITS,
                    index_bits: int = 0) -> float:
    """Stored bits per weight of a layer of ``numel`` weights.

    ``blocks``: its int codes with their parameters; ``fp_values`` values kept at ``fp_bits``
    (outliers, weak columns); ``index_bits``: where they sit (indices, CSR row pointers, permutations).
    """
    total = sum(b.total for b in blocks) + fp_values * fp_bits + index_bits
    return total / numel


__all__ = ["CodeBlock", "bits_per_weight", "FP16_BITS"]
