"""Low-precision floating-point element formats: FP8, FP6, FP4, plus MX and NVFP4 block scaling.

Element formats (sign | exponent | mantissa, value ``(-1)^s * 2^(e - bias) * 1.m`` for normals and
``(-1)^s * 2^(1 - bias) * 0.m`` for subnormals):

========  ====  ====  ==========  ===========  ============  ========================================
format    bias  emax  max normal  min normal   min subnorm.  specials
========  ====  ====  ==========  ===========  ============  ========================================
``e4m3``  7     8     448         2^-6         2^-9          OCP FP8 "fn": NaN = S.1111.111, no inf
``e5m2``  15    15    57344       2^-14        2^-16         IEEE-like: inf (S.11111.00), NaN
``e3m2``  3     4     28          0.25         0.0625        OCP MX FP6: none (all 64 codes finite)
``e2m3``  1     2     7.5         1            0.125         OCP MX FP6: none
``e2m1``  1     2     6           1            0.5           OCP MX FP4: none; ±{0,.5,1,1.5,2,3,4,6}
========  ====  ====  ==========  ===========  ============  ========================================

Codes are one ``uint8`` per element (not packed), laid out ``sign | exponent | mantissa`` in the
low ``bits`` bits (OCP MX v1.0 layout for FP6/FP4; the raw ``torch.float8_*`` byte for FP8).
Rounding is to nearest, ties to even, saturating to ±max (finite inputs never give inf/NaN).
FP8 uses torch's own casts (values are clamped to ±max first, because torch maps out-of-range
values to NaN (e4m3fn) or inf (e5m2)); FP6/FP4 use exact integer tricks on the fp32 bits.

Scaled quantization (``quantize_float``) picks one scale per group of ``group_view``:

* ``scale_dtype`` float32/float16/bfloat16: ``scale = absmax / fmt.max`` (stored in that dtype);
  with ``pow2_scale`` the scale is rounded *up* to a power of two (ZeroQuant-FP) so nothing clips.
* ``e8m0`` (OCP Microscaling v1.0): ``shared_exp = floor(log2(absmax)) - emax_elem`` clamped to
  [-127, 127], stored as the biased byte ``shared_exp + 127``; elements that exceed the element max
  after scaling saturate.
* ``e4m3`` with ``global_scale`` (NVFP4): fp32 ``global = amax / (fmt.max * 448)``, fp8 block scale
  ``e4m3(block_absmax / (fmt.max * global))`` and elements ``x / (e4m3_scale * global)``.

All arithmetic is fp32; bf16/fp16 inputs are converted exactly, fp64 inputs are rounded to fp32.
Large tensors are processed in cache-sized chunks so temporaries stay small.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.ste import straight_through
from lowbit.core.granularity import GroupLayout, group_view, param_shape, ungroup
from lowbit.spec import QuantSpec, SpecError

__all__ = [
    "FloatFormat",
    "FORMATS",
    "E4M3",
    "E5M2",
    "E3M2",
    "E2M3",
    "E2M1",
    "E2M1_VALUES",
    "get_format",
    "float_grid",
    "round_to_format",
    "encode",
    "decode",
    "mx_shared_exponent",
    "e8m0_to_float",
    "nvfp4_global_scale",
    "FloatQuantized",
    "quantize_float",
    "dequantize_float",
    "fake_quant_float",
]


@dataclass(frozen=True)
class FloatFormat:
    """A sign/exponent/mantissa element format; ``torch_dtype`` is set for the two FP8 formats."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_normal: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    has_nan: bool
    torch_dtype: torch.dtype | None = None

    @property
    def bits(self) -> int:
        """Total bits per element (sign + exponent + mantissa)."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (``1 - bias``)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal (``emax_elem`` of the OCP MX spec)."""
        return math.floor(math.log2(self.max_normal))

    @property
    def max(self) -> float:
        """Alias of ``max_normal``."""
        return self.max_normal


E4M3 = FloatFormat("e4m3", 4, 3, 7, 448.0, 2.0**-6, 2.0**-9, False, True, torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, 15, 57344.0, 2.0**-14, 2.0**-16, True, True, torch.float8_e5m2)
E3M2 = FloatFormat("e3m2", 3, 2, 3, 28.0, 0.25, 0.0625, False, False)
E2M3 = FloatFormat("e2m3", 2, 3, 1, 7.5, 1.0, 0.125, False, False)
E2M1 = FloatFormat("e2m1", 2, 1, 1, 6.0, 1.0, 0.5, False, False)
FORMATS: dict[str, FloatFormat] = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1)}
# Non-negative FP4 E2M1 values in code order (code = index, sign bit 0b1000).
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

_CHUNK = 1 << 18  # elements per chunk: 1 MiB of fp32, so the working set stays in L2
_SIGN_MASK_I32 = -(1 << 31)
_LITTLE = sys.byteorder == "little"


def get_format(fmt: str | FloatFormat) -> FloatFormat:
    """Look up an element format by name (``e4m3``, ``e5m2``, ``e3m2``, ``e2m3``, ``e2m1``)."""
    if isinstance(fmt, FloatFormat):
        return fmt
    key = str(fmt).lower()
    if key not in FORMATS:
        raise ValueError(f"unknown float format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[key]


# ---------------------------------------------------------------------------------------- chunks
def _chunk(device: torch.device) -> int:
    """Elements per chunk: cache-sized on CPU; one piece on accelerators (fewer kernel launches)."""
    return _CHUNK if device.type == "cpu" else 1 << 62


def _spans(rows: int, cols: int, chunk: int) -> Iterator[tuple[slice, slice]]:
    """Cover a ``rows x cols`` array with row blocks (or column pieces of one row) of <= chunk."""
    if cols == 0 or rows == 0:
        return
    if cols <= chunk:
        step = max(1, chunk // cols)
        for r0 in range(0, rows, step):
            yield slice(r0, min(rows, r0 + step)), slice(0, cols)
        return
    for r in range(rows):
        for c0 in range(0, cols, chunk):
            yield slice(r, r + 1), slice(c0, min(cols, c0 + chunk))


class _Work:
    """Scratch buffers reused across the chunks of one call."""

    def __init__(self, numel: int, device: torch.device) -> None:
        n = min(numel, _chunk(device))
        self.f32 = torch.empty(n, dtype=torch.float32, device=device)
        self.i32 = torch.empty(n, dtype=torch.int32, device=device)
        self.u8 = torch.empty(n, dtype=torch.uint8, device=device)

    def take(self, buf: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return buf[: shape[0] * shape[1]].view(shape)


# ---------------------------------------------------------------------------------- encode kernels
def _sign_bits(y: torch.Tensor, out: torch.Tensor, nbits: int) -> None:
    """``out`` (uint8) <- sign of fp32 ``y`` placed at bit ``nbits - 1``."""
    if _LITTLE:
        hi = y.view(torch.uint8)[:, 3::4]
        torch.bitwise_and(hi, 0x80, out=out)
        out.bitwise_right_shift_(8 - nbits)
    else:  # pragma: no cover - big-endian hosts
        out.copy_(torch.signbit(y)).bitwise_left_shift_(nbits - 1)


def _encode_fp8_(y: torch.Tensor, fmt: FloatFormat, out: torch.Tensor, work: _Work) -> None:
    """Saturate then cast with torch (round-to-nearest-even); ``out`` is a uint8 view."""
    y.clamp_(-fmt.max_normal, fmt.max_normal)
    assert fmt.torch_dtype is not None
    out.view(fmt.torch_dtype).copy_(y)


def _encode_small_(y: torch.Tensor, fmt: FloatFormat, out: torch.Tensor, work: _Work) -> None:
    """FP6/FP4 codes of fp32 ``y`` (destroyed), ties to even, saturating, NaN -> +0.

    With ``E' = max(floor(log2|y|), emin)`` the grid step near ``|y|`` is ``q = 2^(E'-m)``.
    Adding ``K = 2^23 q`` makes fp32 itself round ``|y|`` to a multiple of ``q`` (RNE), and
    ``bits(|y| + K) - bits(K) = round(|y| / q) = k``.  The code is ``k + ((E' - emin) << m)``,
    which also covers subnormals (``E' = emin``) and carries into the next binade.
    """
    m, nbits = fmt.man_bits, fmt.bits
    sign = work.take(work.u8, y.shape)
    y.nan_to_num_(nan=0.0).clamp_(-fmt.max_normal, fmt.max_normal)
    _sign_bits(y, sign, nbits)
    y.abs_()
    bits = y.view(torch.int32)
    k_bits = work.take(work.i32, y.shape)
    torch.bitwise_and(bits, 0x7F800000, out=k_bits)
    k_bits.clamp_(min=(fmt.emin + 127) << 23).add_((23 - m) << 23)
    y.add_(k_bits.view(torch.float32))
    bits.sub_(k_bits)
    k_bits.bitwise_right_shift_(23 - m)  # (E' + 150 - m) << m, exactly
    bits.add_(k_bits).sub_((fmt.emin + 150 - m) << m)
    out.copy_(bits)
    out.bitwise_or_(sign)


def _encode_(y: torch.Tensor, fmt: FloatFormat, out: torch.Tensor, work: _Work) -> None:
    if fmt.torch_dtype is not None:
        _encode_fp8_(y, fmt, out, work)
    else:
        _encode_small_(y, fmt, out, work)


def _encode_2d(
    xg: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None, pow2: bool = False
) -> torch.Tensor:
    """uint8 codes of ``xg / scale`` (``scale``: positive ``(G, 1)`` fp32, or None), chunk by chunk.

    With ``pow2`` (every scale a power of two) the division is replaced by the product with the
    exact reciprocal, which gives the same correctly rounded result faster.
    """
    rows, cols = xg.shape
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=xg.device)
    work = _Work(rows * cols, xg.device)
    inverse = scale.reciprocal() if (scale is not None and pow2) else None
    for rs, cs in _spans(rows, cols, _chunk(xg.device)):
        src = xg[rs, cs]
        y = work.take(work.f32, src.shape)
        if scale is None:
            y.copy_(src)
        elif inverse is not None:
            torch.mul(src, inverse[rs], out=y)
        else:
            torch.div(src, scale[rs], out=y)
        _encode_(y, fmt, codes[rs, cs], work)
    return codes


# ---------------------------------------------------------------------------------- decode kernels
def _has_fp8_specials(codes: torch.Tensor, fmt: FloatFormat) -> bool:
    """True when any code is NaN (e4m3fn) or inf/NaN (e5m2); checked with two cheap reductions."""
    if codes.numel() == 0:
        return False
    first = 0x7F if fmt.name == "e4m3" else 0x7C  # smallest special magnitude code
    pos = int(codes.view(torch.int8).max()) >= first
    neg = int(codes.max()) >= 0x80 + first
    return pos or neg


def _decode_(codes: torch.Tensor, fmt: FloatFormat, out: torch.Tensor, work: _Work) -> None:
    """fp32 ``out`` <- values of ``codes`` (FP8: finite codes only, times ``2^(bias - 127)``).

    The code is shifted so its sign reaches bit 7 and read as int8, so widening to int32
    sign-extends it; one more shift puts the exponent field in the fp32 exponent field.
    FP8: a mask clears the sign copies and the fp32 number is ``value * 2^(bias - 127)`` for
    normals and subnormals alike; the caller folds ``2^(127 - bias)`` into its scale multiply.
    FP6/FP4 (where subnormal codes are common, and fp32 subnormal arithmetic is slow): the
    exponent is rebiased in the integer domain, giving ``A = 2^(e - bias) * 1.m`` (also for
    ``e = 0``), and subnormals are fixed exactly by ``A + min(A - 2^emin, 0) = 2^emin * 0.m``.
    """
    pre = 8 - fmt.bits
    if pre:
        src = work.take(work.u8, codes.shape)
        torch.bitwise_left_shift(codes, pre, out=src)
    else:
        src = codes
    bits = out.view(torch.int32)
    bits.copy_(src.view(torch.int8))
    bits.bitwise_left_shift_(23 - fmt.man_bits - pre)
    if fmt.torch_dtype is not None:
        bits.bitwise_and_(_SIGN_MASK_I32 | ((1 << (23 + fmt.exp_bits)) - 1))
        return
    sign = work.take(work.i32, codes.shape)
    torch.bitwise_and(bits, _SIGN_MASK_I32, out=sign)
    bits.bitwise_and_((1 << (23 + fmt.exp_bits)) - 1).add_((127 - fmt.bias) << 23)
    fix = work.take(work.f32, codes.shape)
    torch.sub(out, fmt.min_normal, out=fix)
    out.add_(fix.clamp_(max=0.0))
    bits.bitwise_or_(sign)


def _decode_2d(codes: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``decode(codes) * scale`` for ``(G, E)`` codes and a ``(G, 1)`` fp32 scale (or None)."""
    rows, cols = codes.shape
    out = torch.empty((rows, cols), dtype=torch.float32, device=codes.device)
    if fmt.torch_dtype is not None and _has_fp8_specials(codes, fmt):
        out.copy_(codes.view(fmt.torch_dtype))  # torch's own conversion keeps inf/NaN
        return out if scale is None else out.mul_(scale)
    unit = 2.0 ** (127 - fmt.bias) if fmt.torch_dtype is not None else 1.0
    factor = None if scale is None else scale * unit
    split = factor is not None and not bool(torch.isfinite(factor).all())  # 2^k * scale overflows
    work = _Work(rows * cols, codes.device)
    for rs, cs in _spans(rows, cols, _chunk(codes.device)):
        o = out[rs, cs]
        _decode_(codes[rs, cs], fmt, o, work)
        if factor is None:
            if unit != 1.0:
                o.mul_(unit)
        elif split:
            assert scale is not None
            o.mul_(unit).mul_(scale[rs])
        else:
            o.mul_(factor[rs])
    return out


# ------------------------------------------------------------------------------ element functions
def encode(x: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """uint8 codes (``sign|exponent|mantissa``) of ``x`` rounded to ``fmt``, same shape as ``x``.

    Round to nearest, ties to even, saturating to ±max.  FP8 NaN stays NaN; FP6/FP4 have no
    NaN, so NaN encodes as +0.
    """
    f = get_format(fmt)
    codes = _encode_2d(x.reshape(1, -1), f, None)
    return codes.reshape(x.shape)


def decode(codes: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """fp32 values of uint8 ``codes`` (bits above ``fmt.bits`` are ignored); exact."""
    f = get_format(fmt)
    if codes.dtype != torch.uint8:
        if codes.dtype.is_floating_point:
            raise TypeError(f"decode expects uint8 codes, got {codes.dtype}")
        codes = codes.to(torch.uint8)
    out = _decode_2d(codes.reshape(1, -1), f, None)
    return out.reshape(codes.shape)


def round_to_format(x: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest value of ``fmt`` (ties to even), saturating to ±max.

    For FP8 this equals ``x.clamp(-max, max).to(torch.float8_*).float()`` bit for bit.
    """
    f = get_format(fmt)
    return decode(encode(x, f), f)


def float_grid(fmt: str | FloatFormat) -> torch.Tensor:
    """All non-negative finite values of ``fmt`` in increasing order (index = magnitude code)."""
    f = get_format(fmt)
    codes = torch.arange(1 << (f.bits - 1), dtype=torch.uint8)
    values = decode(codes, f)
    return values[torch.isfinite(values)]


# ----------------------------------------------------------------------------------- scale helpers
def mx_shared_exponent(absmax: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """OCP MX shared exponent ``floor(log2(absmax)) - emax_elem`` clamped to [-127, 127] (int32).

    Read from the fp32 exponent field, so a zero (or fp32-subnormal) block gives -127 without
    evaluating ``log2(0)``.
    """
    f = get_format(fmt)
    field = absmax.float().abs().view(torch.int32).bitwise_right_shift(23).bitwise_and(0xFF)
    return (field - 127 - f.emax).clamp_(-127, 127)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^(code - 127)`` of E8M0 bytes (code 255 is NaN, code 0 is 2^-127, an fp32 subnormal)."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, torch.full_like(c, 1 << 22), c.bitwise_left_shift(23))
    out = bits.view(torch.float32).clone()
    out[c == 255] = float("nan")
    return out


def nvfp4_global_scale(amax: torch.Tensor, fmt: str | FloatFormat = E2M1) -> torch.Tensor:
    """fp32 per-tensor NVFP4 scale ``amax / (fmt.max * 448)``; 1.0 for an all-zero tensor.

    Same definition as NVIDIA TensorRT-Model-Optimizer (``weights_scaling_factor_2``) and torchao
    (``per_tensor_amax_to_scale``); compressed-tensors stores the reciprocal.  Dividing by both
    maxima lets the block that holds ``amax`` use the full E4M3 range (block scale 448).
    """
    f = get_format(fmt)
    g = amax.float() / (f.max_normal * E4M3.max_normal)
    return torch.where(g > 0, g, torch.ones_like(g))


def _pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``r`` (fp64 in, fp32 out), kept in the fp32 normal range; 0 -> 0."""
    mant, exp = torch.frexp(r)
    e = (exp - (mant == 0.5).to(exp.dtype)).clamp(-126, 127)
    p = torch.ldexp(torch.ones_like(r), e).float()
    return torch.where(r > 0, p, torch.zeros_like(p))


_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _float_scales(absmax: torch.Tensor, fmt: FloatFormat, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scales, fp32 scales) for float32/float16/bfloat16 scale dtypes."""
    dtype = _STORAGE[spec.scale_dtype]
    if spec.pow2_scale:
        scale = _pow2_ceil(absmax.double() / fmt.max_normal)
    else:
        scale = absmax / fmt.max_normal
    if dtype != torch.float32:  # keep non-zero scales finite and non-zero in the storage dtype
        info = torch.finfo(dtype)
        hi = 2.0 ** math.floor(math.log2(info.max)) if spec.pow2_scale else info.max
        scale = torch.where(scale > 0, scale.clamp(info.tiny, hi), scale)
    stored = scale.to(dtype)
    return stored, stored.float()


def _e8m0_scales(absmax: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 biased exponents, fp32 ``2^shared_exp``) per OCP MX v1.0."""
    codes = (mx_shared_exponent(absmax, fmt) + 127).to(torch.uint8)
    return codes, e8m0_to_float(codes)


def _e4m3_scales(
    absmax: torch.Tensor, fmt: FloatFormat, global_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn block scales, fp32 effective scales); NVFP4 when ``global_scale`` is given.

    As in TensorRT-Model-Optimizer: ``block = absmax / (fmt.max * global)``, an exactly-zero
    block scale becomes 1.0, then the fp32 value is cast to E4M3 (clamped to [2^-9, 448] first so
    it can neither underflow to 0 nor overflow), and the effective scale is
    ``float(e4m3) * global``.
    """
    g = global_scale if global_scale is not None else torch.ones((), device=absmax.device)
    raw = absmax / (fmt.max_normal * g)
    raw = torch.where(raw == 0, torch.ones_like(raw), raw).clamp(E4M3.min_subnormal, E4M3.max_normal)
    stored = raw.to(torch.float8_e4m3fn)
    return stored, stored.float() * g


# ------------------------------------------------------------------------------ scaled quantization
@dataclass
class FloatQuantized:
    """A tensor quantized to a float element format with per-group scales.

    Attributes:
        codes: uint8 ``(G, E)`` element codes, one per element of ``group_view`` (not packed);
            ``ungroup(codes, layout)`` gives them in the input's shape.
        scales: per-group scales of shape ``param_shape(layout)`` in their storage type:
            float32/float16/bfloat16, uint8 E8M0 biased exponents (MX), or
            ``torch.float8_e4m3fn`` (NVFP4 block scales).
        global_scale: fp32 0-d per-tensor scale (NVFP4) or None; it multiplies ``scales``.
        layout: the ``GroupLayout`` that ``ungroup`` needs.
        spec: the ``QuantSpec`` used.
        dtype: dtype of the original input (restored by ``dequantize_float``).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    layout: GroupLayout
    spec: QuantSpec
    dtype: torch.dtype

    @property
    def fmt(self) -> FloatFormat:
        """The element format."""
        assert self.spec.fmt is not None
        return FORMATS[self.spec.fmt]

    def group_scales(self) -> torch.Tensor:
        """Effective fp32 multiplier per group (global scale included), shape ``param_shape``."""
        return _effective_scales(self.scales, self.global_scale, self.spec)

    def values(self) -> torch.Tensor:
        """Unscaled fp32 element values in the ``(G, E)`` view."""
        return _decode_2d(self.codes, self.fmt, None)


def _effective_scales(scales: torch.Tensor, global_scale: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    if spec.scale_dtype == "e8m0":
        s = e8m0_to_float(scales)
    else:
        s = scales.float()
    if global_scale is not None:
        s = s * global_scale
    return s


def _check_spec(spec: QuantSpec) -> FloatFormat:
    """The element format of a float spec, or SpecError for a non-float spec."""
    if spec.type != "float" or spec.fmt not in FORMATS:
        raise SpecError(
            f"quantize_float needs a spec with type='float' and a float fmt, got {spec.type!r}/{spec.fmt!r}"
        )
    # symmetry, double_quant, global/pow2 scale combinations are validated by QuantSpec itself
    return FORMATS[spec.fmt]


def _group_absmax(xg: torch.Tensor) -> torch.Tensor:
    """fp32 ``(G, 1)`` max |x| per row, computed chunk by chunk (NaN propagates)."""
    rows, cols = xg.shape
    out = torch.zeros((rows, 1), dtype=torch.float32, device=xg.device)
    work = _Work(rows * cols, xg.device)
    for rs, cs in _spans(rows, cols, _chunk(xg.device)):
        src = xg[rs, cs]
        a = work.take(work.f32, src.shape)
        a.copy_(src).abs_()
        m = a.amax(dim=1, keepdim=True)
        out[rs] = m if cs.stop - cs.start == cols else torch.maximum(out[rs], m)
    return out


def quantize_float(
    x: torch.Tensor,
    spec: QuantSpec,
    absmax: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
) -> FloatQuantized:
    """Quantize ``x`` to the float format of ``spec`` with one scale per group.

    ``absmax`` (one value per group, any shape with ``G`` elements) replaces the observed
    max |x| per group, e.g. a clipping range from ``lowbit.core.observers``; it is required when
    ``spec.observer`` is not ``minmax``.  ``global_amax`` replaces the tensor amax of NVFP4.
    """
    fmt = _check_spec(spec)
    xg, layout = group_view(x, spec.granularity, spec.group_size, spec.block, spec.padding)  # type: ignore[arg-type]
    if absmax is None:
        if spec.observer != "minmax":
            raise SpecError(
                f"observer {spec.observer!r} chooses the range outside quantize_float: compute the "
                "per-group absmax with lowbit.core.observers and pass absmax=..."
            )
        amax_g = _group_absmax(xg)
    else:
        amax_g = absmax.detach().float().reshape(-1, 1).abs().to(xg.device)
        if amax_g.shape[0] != xg.shape[0]:
            raise ValueError(f"absmax has {amax_g.shape[0]} values but the spec makes {xg.shape[0]} groups")
    gscale: torch.Tensor | None = None
    if spec.scale_dtype == "e8m0":
        stored, scale = _e8m0_scales(amax_g, fmt)
    elif spec.scale_dtype == "e4m3":
        if spec.global_scale:
            if global_amax is None:
                tensor_amax = amax_g.max()
            else:
                tensor_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=amax_g.device)
            gscale = nvfp4_global_scale(tensor_amax.reshape(()), fmt)
        stored, scale = _e4m3_scales(amax_g, fmt, gscale)
    else:
        stored, scale = _float_scales(amax_g, fmt, spec)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    pow2 = spec.scale_dtype == "e8m0" or spec.pow2_scale
    codes = _encode_2d(xg, fmt, divisor, pow2=pow2)
    return FloatQuantized(codes, stored.reshape(param_shape(layout)), gscale, layout, spec, x.dtype)


def dequantize_float(qt: FloatQuantized) -> torch.Tensor:
    """Reconstruct the tensor (original shape and dtype) from a ``FloatQuantized``."""
    scale = _effective_scales(qt.scales, qt.global_scale, qt.spec).reshape(-1, 1)
    out = _decode_2d(qt.codes, qt.fmt, scale)
    return ungroup(out, qt.layout).to(qt.dtype)


def fake_quant_float(x: torch.Tensor, spec: QuantSpec, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_float(quantize_float(x, spec))`` with a straight-through (identity) gradient."""
    with torch.no_grad():
        y = dequantize_float(quantize_float(x.detach(), spec, absmax=absmax))
    return straight_through(x, y)
