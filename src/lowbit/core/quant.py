"""One entry point over every format: ``quantize`` / ``dequantize`` / ``fake_quant`` by QuantSpec.

``quantize(x, spec)`` dispatches on ``spec.type`` to the affine (int), float (FP8/FP6/FP4,
MX, NVFP4) or codebook (NF4, k-means, log, binary, ternary, BCQ) implementation and returns
that implementation's result object; ``dequantize`` takes any of them back to a tensor of the
input's shape and dtype.  ``storage_bits`` counts every stored bit per element (codes, scales,
zero points, LUTs, second-level scales).
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch

from lowbit.core.affine import IntQuantized, dequantize_int, fake_quant_int, quantize_int
from lowbit.core.codebooks import (
    CodebookQuantized,
    dequantize_codebook,
    fake_quant_codebook,
    quantize_codebook,
    storage_bits_per_weight,
)
from lowbit.core.floats import FloatQuantized, dequantize_float, fake_quant_float, quantize_float
from lowbit.spec import SCALE_BITS, QuantSpec

Quantized = Union[IntQuantized, FloatQuantized, CodebookQuantized]



def quantize(x: torch.Tensor, spec: QuantSpec, **kwargs: Any) -> Quantized:
    """Quantize ``x`` to ``spec``; keyword arguments go to the format's implementation
    (int: ``xmin``/``xmax``; float: ``absmax``/``global_amax``; codebook: ``weights``/``iters``)."""
    if spec.type == "int":
        return quantize_int(x, spec, **kwargs)
    if spec.type == "float":
        return quantize_float(x, spec, **kwargs)
    return quantize_codebook(x, spec, **kwargs)


def dequantize(qt: Quantized) -> torch.Tensor:
    """Reconstruct a tensor (original shape and dtype) from any quantized result."""
    if isinstance(qt, IntQuantized):
        return dequantize_int(qt)
    if isinstance(qt, FloatQuantized):
        return dequantize_float(qt)
    if isinstance(qt, CodebookQuantized):
        return dequantize_codebook(qt)
    raise TypeError(f"dequantize() takes a lowbit quantized result, got {type(qt).__name__}")


def fake_quant(x: torch.Tensor, spec: QuantSpec, **kwargs: Any) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient, for any spec."""
    if spec.type == "int":
        return fake_quant_int(x, spec, **kwargs)
    if spec.type == "float":
        return fake_quant_float(x, spec, **kwargs)
    return fake_quant_codebook(x, spec, **kwargs)


def storage_bits(qt: Quantized, scale_dtype: str = "float32") -> float:
    """Average stored bits per element, overhead included.

    int: ``bits`` per code plus, per group, a scale stored at ``scale_dtype`` width (the spec's;
    fp32 by default, 16 for fp16/bf16) and, for asymmetric specs, a zero point of ``bits`` bits.
    float: element bits plus stored scale bits (E8M0 = 8, E4M3 = 8) plus the fp32 global scale.
    """
    if isinstance(qt, CodebookQuantized):
        return storage_bits_per_weight(qt)
    numel = math.prod(qt.layout.shape)
    groups = qt.layout.num_groups
    if isinstance(qt, IntQuantized):
        total = numel * qt.bits + groups * SCALE_BITS[scale_dtype]
        if not qt.symmetric:
            total += groups * qt.bits
        return total / numel
    if isinstance(qt, FloatQuantized):
        total = numel * qt.spec.bits + qt.scales.numel() * qt.scales.element_size() * 8
        if qt.global_scale is not None:
            total += 32
        return total / numel
    raise TypeError(f"storage_bits() takes a lowbit quantized result, got {type(qt).__name__}")
