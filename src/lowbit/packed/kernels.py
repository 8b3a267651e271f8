"""Matmul kernels for packed integer weights, and the short probe that picks one per layer shape.

Every kernel computes ``x @ W^T`` for ``W = scale * (q - zero)``; they differ only in what they
keep in memory and how fast they are on a given machine:

* ``dequant``: unpack the int32 words and dequantize at every call (in row chunks of at most
  ``DEQUANT_CHUNK_ELEMENTS`` weights, so a call never holds a whole large fp weight), then a GEMM
  (any bits, any groups; the reference).
* ``int4pack``: torch's tinygemm CPU kernel (``_weight_int4pack_mm_for_cpu``) on its own packed
  layout: 4-bit, group size 32/64/128/256, integer zero points folded into a float offset.
* ``int8pack``: torch's ``_weight_int8pack_mm``: 8-bit symmetric, one scale per output row.
* ``int8x8``: W8A8, inputs quantized per token to int8 and multiplied by the int8 weights with
  ``torch._int_mm`` (int32 accumulation): only for layers with such an input quantizer.
* ``native``: lowbit's own fp32 GEMV (``lowbit.packed.native``, built for this machine) reading the
  stored 4- / 8-bit words directly: decode only (a few tokens), and where it applies it is taken by
  rule, untimed: it reads each weight byte once at memory speed and computes in fp32, which none of
  the others do (measured per shape in benchmarks/results/kernels.md).  The same library dequantizes
  4- / 8-bit weights for ``dequant`` in one pass (bit-identical to the torch expression).

``int4pack`` and ``int8pack`` are row-at-a-time kernels: with fp32 inputs (torch 2.13, this CPU)
their time grows linearly with the token count at 0.2-2 ms per token per layer, where a GEMM
costs microseconds per token; at 512 tokens (one thread) a 1536x576 layer took 727 ms in
``int4pack`` and 7 ms in dequantize + GEMM.  They are therefore only decode candidates
(``ROW_KERNELS``); with bf16 inputs and scales tinygemm is ~25x faster (0.05 ms a token for that
layer), but that rounds activations and scales to bf16, so it is not offered.

``choose_kernels`` times the candidates of each regime on a short random input (``PROBE_TOKENS``:
1 token for decode, 64 for prefill), takes a regime's only candidate untimed, and caches the
choice per layer signature (shape, bits, group, zero points, dtype, device, threads, input
quantizer) for the process, so a model whose layers have a few distinct shapes probes only a few
times.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Hashable

import torch
import torch.nn.functional as F

from lowbit.core.packing import to_signed, unpack
from lowbit.packed import native
from lowbit.packed.intweight import IntWeight, expand_groups
from lowbit.spec import QuantSpec

Kernel = Callable[[torch.Tensor], torch.Tensor]

DEQUANT_CHUNK_ELEMENTS = 1 << 22  # weights dequantized at once by the ``dequant`` kernel (16 MiB fp32)
ROW_KERNELS = frozenset({"int4pack", "int8pack", "native"})  # cost linear in tokens: decode only
RULE_KERNELS = ("native",)  # taken for decode without timing where they apply
PROBE_TOKENS = {"decode": 1, "prefill": 64}
REGIMES = tuple(PROBE_TOKENS)

_CHOICES: dict[Hashable, tuple[dict[str, str], dict[str, dict[str, float]]]] = {}


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Signed int8 codes from compressed-tensors int32 words (a byte split for 4 and 8 bits)."""
    u, offset = _offset_codes(packed, bits, shape)
    return (u.to(torch.int16) - offset).to(torch.int8)


def _offset_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int], dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, int]:
    """Codes as stored, ``(u, offset)`` with signed code ``u - offset``: for 4 and 8 bits ``u`` is the
    unsigned nibble / byte (a byte split, no arithmetic) and ``offset = 2^(b-1)``; other widths give
    signed codes and 0.  ``u`` is uint8 / int8, or contiguous ``dtype`` when given (for 4 bits the
    nibbles are then written straight into the float tensor: one pass fewer than split-then-convert)."""
    rows, cols = shape
    if bits in (4, 8) and sys.byteorder == "little":
        raw = packed.contiguous().view(torch.uint8)
        if bits == 4:
            u = torch.empty(*raw.shape, 2, dtype=dtype or torch.uint8, device=raw.device)
            if dtype is None:
                torch.bitwise_and(raw, 0xF, out=u[..., 0])
                torch.bitwise_right_shift(raw, 4, out=u[..., 1])
            else:
                u[..., 0] = raw & 0xF
                u[..., 1] = raw >> 4
            raw = u.view(rows, -1)
        u = raw[:, :cols]
        return (u if dtype is None else u.to(dtype).contiguous()), 1 << (bits - 1)
    q = to_signed(unpack(packed, bits, cols, "int32"), bits)
    return (q if dtype is None else q.to(dtype).contiguous()), 0


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int | None, g_idx: torch.Tensor | None, bits: int, shape: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """``scale[:, g] * (q - zero[:, g])`` straight from the packed words.

    Contiguous groups broadcast the per-group ``(offset + zero)`` and ``scale`` over a
    ``(rows, groups, group_size)`` view (two in-place passes, no per-column copies); the result is
    bit-identical to ``(q - zero) * scale`` in ``dtype``, as the subtraction of small integers is exact."""
    rows, cols = shape
    gs = cols if group_size is None else group_size
    if native_layout(packed, scale, zero, bits, gs, g_idx, shape, dtype) and native.available():
        return native.dequant(packed, scale, zero, bits, gs, shape)
    w, offset = _offset_codes(packed, bits, shape, dtype)
    if g_idx is None and cols % gs == 0 and scale.shape[-1] == cols // gs:
        ng = cols // gs
        shift = torch.full((1, 1), float(offset), dtype=dtype, device=w.device) if zero is None \
            else zero.to(dtype) + offset
        v = w.view(rows, ng, gs)
        if offset or zero is not None:
            v.sub_(shift.reshape(shift.shape[0], -1, 1))
        v.mul_(scale.to(dtype).reshape(rows, ng, 1))
        return w
    if offset or zero is not None:
        shift = float(offset) if zero is None else expand_groups(zero.to(dtype) + offset, group_size, g_idx, cols)
        w = w - shift
    return w * expand_groups(scale.to(dtype), group_size, g_idx, cols)


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group_size: int | None, g_idx: torch.Tensor | None, bits: int, shape: tuple[int, int],
                   dtype: torch.dtype, bias: torch.Tensor | None = None,
                   chunk_elements: int | None = None) -> torch.Tensor:
    """``x @ dequant(W)^T + bias``, dequantizing at most ``chunk_elements`` weights (whole output rows)
    at a time: one GEMM (the reference itself) when the weight fits, else one GEMM per row chunk."""
    rows, cols = shape
    step = max(1, (chunk_elements or DEQUANT_CHUNK_ELEMENTS) // cols)
    if step >= rows:
        w = dequantize_packed(packed, scale, zero, group_size, g_idx, bits, shape, dtype)
        return F.linear(x, w.to(x.dtype), bias)
    x2 = x.reshape(-1, cols)
    y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = dequantize_packed(packed[r0:r1], scale[r0:r1], None if zero is None else zero[r0:r1], group_size,
                              g_idx, bits, (r1 - r0, cols), dtype)
        y[:, r0:r1] = F.linear(x2, w.to(x.dtype), None if bias is None else bias[r0:r1])
    return y.reshape(*x.shape[:-1], rows)


def native_layout(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                  g_idx: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> bool:
    """The tensors are what the native kernels read: 4- / 8-bit words holding whole rows (no padding), groups
    that tile the row in column order, contiguous fp32 scales, int8 zero points, fp32 compute, on the CPU."""
    rows, cols = shape
    return (bits in (4, 8) and g_idx is None and cols % group_size == 0 and dtype == torch.float32
            and packed.device.type == "cpu" and packed.dtype == torch.int32 and packed.is_contiguous()
            and packed.shape == (rows, cols * bits // 32) and (cols * bits) % 32 == 0
            and scale.dtype == torch.float32 and scale.is_contiguous() and scale.shape == (rows, cols // group_size)
            and (zero is None or (zero.dtype == torch.int8 and zero.is_contiguous() and zero.shape == scale.shape))
            and sys.byteorder == "little")


def int4pack_applicable(w: IntWeight) -> bool:
    k = w.shape[1]
    return (w.bits == 4 and w.g_idx is None and w.group_size in (32, 64, 128, 256)
            and k % w.group_size == 0 and w.shape[0] % 8 == 0 and k % 16 == 0 and w.scale.device.type == "cpu"
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


def fastest(kernels: dict[str, Kernel], x: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-2,
            rounds: int = 5) -> tuple[str, dict[str, float]]:
    """Name of the fastest kernel whose output agrees with ``reference`` (relative error), and all timings
    (ties keep the first, so list the reference kernel first).  The kernels take turns, ``rounds`` times,
    each keeping its best, so a burst of load from another process does not fall on one kernel only."""
    scale = reference.norm().item() or 1.0
    agree = []
    for name, fn in kernels.items():
        with torch.no_grad():
            err = (fn(x).float() - reference.float()).norm().item() / scale
        if err <= rtol:
            agree.append(name)
    times = {name: float("inf") for name in agree}
    for _ in range(rounds):
        for name in agree:
            times[name] = min(times[name], time_call(kernels[name], x, repeats=1))
    best = min(times, key=times.__getitem__) if times else "dequant"
    return best, times


def regime_candidates(names: list[str], regime: str) -> list[str]:
    """The kernels worth timing for ``regime``: row-at-a-time kernels only for decode, where a rule kernel
    that applies is the only candidate (taken untimed)."""
    if regime == "decode":
        ruled = [n for n in RULE_KERNELS if n in names]
        return ruled[:1] or list(names)
    return [n for n in names if n not in ROW_KERNELS]


def choose_kernels(key: Hashable, names: list[str], build: Callable[[list[str]], dict[str, Kernel]],
                   reference: Kernel, in_features: int, device: torch.device | str,
                   probe_tokens: dict[str, int] | None = None, force: bool = False
                   ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """``({regime: kernel}, {regime: {kernel: seconds}})`` for a layer whose applicable kernels are
    ``names`` (``"dequant"`` first): cached under ``key`` unless ``force``.  Each regime with more than
    one candidate times them on ``probe_tokens[regime]`` random tokens (``build(names)`` makes the
    kernels); a single candidate is taken untimed."""
    key = (key, time_call)  # choices made with one timer (tests patch it) are not another's
    if not force and key in _CHOICES:
        choice, timings = _CHOICES[key]
        return dict(choice), {r: dict(t) for r, t in timings.items()}
    tokens = probe_tokens or PROBE_TOKENS
    wanted = {r: regime_candidates(names, r) for r in REGIMES}
    fns = build(sorted({n for c in wanted.values() for n in c}, key=names.index))
    choice: dict[str, str] = {}
    timings: dict[str, dict[str, float]] = {}
    for regime in REGIMES:
        cands = wanted[regime]
        if len(cands) == 1:
            choice[regime], timings[regime] = cands[0], {}
            continue
        x = torch.randn(tokens[regime], in_features, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            ref = reference(x)
        choice[regime], timings[regime] = fastest({n: fns[n] for n in cands}, x, ref)
    _CHOICES[key] = (dict(choice), {r: dict(t) for r, t in timings.items()})
    return choice, timings


def clear_choices() -> None:
    """Forget every cached kernel choice (the next ``select_kernel`` probes again)."""
    _CHOICES.clear()
