"""Matmul kernels for packed integer weights, and the measurement that picks one per layer.

Every kernel computes ``x @ W^T`` for ``W = scale * (q - zero)``; they differ only in what they
keep in memory and how fast they are on a given machine:

* ``dequant``: unpack the int32 words and dequantize at every call, then ``F.linear`` (any bits,
  any groups; the reference).
* ``int4pack``: torch's tinygemm CPU kernel (``_weight_int4pack_mm_for_cpu``) on its own packed
  layout: 4-bit, group size 32/64/128/256, integer zero points folded into a float offset.
* ``int8pack``: torch's ``_weight_int8pack_mm``: 8-bit symmetric, one scale per output row.
* ``int8x8``: W8A8, inputs quantized per token to int8 and multiplied by the int8 weights with
  ``torch._int_mm`` (int32 accumulation): only for layers with such an input quantizer.

``measure_kernels`` times each applicable kernel on the layer's real shape and keeps the
fastest, separately for decode (one token) and prefill (many tokens): on an AVX2-only CPU the
int8/int4 kernels were measured 20-40x slower than an fp32 GEMV, so nothing is trusted blindly.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from lowbit.core.packing import to_signed, unpack
from lowbit.packed.intweight import IntWeight, expand_groups
from lowbit.spec import QuantSpec

Kernel = Callable[[torch.Tensor], torch.Tensor]


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Signed int8 codes from compressed-tensors int32 words (a byte split for 4 and 8 bits)."""
    rows, cols = shape
    if bits in (4, 8) and sys.byteorder == "little":
        raw = packed.contiguous().view(torch.uint8)
        if bits == 4:
            raw = torch.stack((raw & 0xF, raw >> 4), dim=-1).reshape(rows, -1)
        return (raw[:, :cols].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    return to_signed(unpack(packed, bits, cols, "int32"), bits)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int | None, g_idx: torch.Tensor | None, bits: int, shape: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """``scale[:, g] * (q - zero[:, g])`` straight from the packed words."""
    q = unpack_codes(packed, bits, shape).to(dtype)
    if zero is not None:
        q = q - expand_groups(zero.to(dtype), group_size, g_idx, shape[1])
    return q * expand_groups(scale.to(dtype), group_size, g_idx, shape[1])


def int4pack_applicable(w: IntWeight) -> bool:
    k = w.shape[1]
    return (w.bits == 4 and w.g_idx is None and w.group_size in (32, 64, 128, 256)
            and k % w.group_size == 0 and w.shape[0] % 8 == 0 and k % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def int4pack_tensors(w: IntWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm layout: packed uint8 weights and ``(K/G, N, 2)`` (scale, offset) with
    ``W = (u - 8) * scale + offset`` for unsigned codes ``u = q + 8``: offset ``= -scale * zero``."""
    u = (w.codes.to(torch.int32) + 8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
    scale = w.scale.float()
    offset = torch.zeros_like(scale) if w.zero is None else -scale * w.zero.float()
    return packed, torch.stack([scale.t(), offset.t()], dim=-1).contiguous()


def int8pack_applicable(w: IntWeight) -> bool:
    return w.bits == 8 and w.zero is None and w.group_size is None and w.g_idx is None \
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8x8_applicable(w: IntWeight, spec: "QuantSpec | None") -> bool:
    """W8A8: int8 per-row symmetric weights and dynamic per-token symmetric int8 inputs."""
    return (spec is not None and spec.type == "int" and spec.bits == 8 and spec.dynamic and spec.symmetric
            and spec.signed and spec.granularity == "token" and not spec.pow2_scale
            and spec.scale_dtype == "float32" and w.bits == 8 and w.zero is None and w.group_size is None
            and w.g_idx is None and hasattr(torch, "_int_mm"))


def int8x8_matmul(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, full_range: bool) -> torch.Tensor:
    """``Q(x) @ W^T`` in integers: per-token int8 codes of ``x`` (the grid of ``lowbit.core.affine``) times
    int8 ``w_t`` (in, out) with ``torch._int_mm`` (int32 accumulation), rescaled by both scales."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    amax = x2.abs().amax(dim=1, keepdim=True)
    s = amax / (127.5 if full_range else 127.0)
    s = torch.where(amax == 0, torch.ones_like(s), s.clamp(min=1e-8))
    q = torch.clamp(torch.round(x2 / s), -128, 127).to(torch.int8)
    y = torch._int_mm(q, w_t).float() * s * w_scale.view(1, -1)
    return y.reshape(*x.shape[:-1], -1)


def time_call(fn: Kernel, x: torch.Tensor, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of ``fn(x)`` after one warm-up call."""
    with torch.no_grad():
        fn(x)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
    return best


def fastest(kernels: dict[str, Kernel], x: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-2
            ) -> tuple[str, dict[str, float]]:
    """Name of the fastest kernel whose output agrees with ``reference`` (relative error), and all timings."""
    times: dict[str, float] = {}
    scale = reference.norm().item() or 1.0
    for name, fn in kernels.items():
        with torch.no_grad():
            err = (fn(x).float() - reference.float()).norm().item() / scale
        if err <= rtol:
            times[name] = time_call(fn, x)
    best = min(times, key=times.__getitem__) if times else "dequant"
    return best, times
