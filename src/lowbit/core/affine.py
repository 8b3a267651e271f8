"""Uniform affine integer quantization: pure tensor functions.

Convention (all arithmetic in float32, whatever the input dtype)::

    q  = clamp(round(x / s) + z, qmin, qmax)        round = half-to-even (torch.round)
    x~ = s * (q - z)

* Ranges: signed ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``.
* Symmetric: ``s = absmax / (2^(b-1) - 1)``; ``z = 0`` for signed ranges and the midpoint
  ``z = 2^(b-1)`` for unsigned ones, so ``q - z`` covers ``[-2^(b-1), 2^(b-1) - 1]`` either way and
  ``+-absmax`` map to ``z +- (2^(b-1) - 1)``.  One bit symmetric has no positive level and is
  rejected (use asymmetric, or the ``binary`` codebook).
* Asymmetric: the range is first widened to contain 0 (``min <= 0 <= max``) so 0 is exact; then
  ``s = (max - min) / (qmax - qmin)`` and ``z = qmin - round(min / s)``.  ``min`` always maps to
  ``qmin``; ``s`` is lowered by a few ulps where float rounding would otherwise send ``max`` to
  ``qmax - 1``, so both ends of the range land exactly on ``qmin`` / ``qmax``.
* Degenerate ranges: an all-zero group gets ``s = 1`` (0 maps to ``z`` and back exactly); other
  scales are floored at ``eps`` (smallest normal float32) so nothing divides by zero.  A constant
  group ``c`` maps to a range end and comes back as ``s * k`` for an integer ``k``: exact for
  bf16/fp16 inputs, within one float32 rounding (<= 1 ulp of ``c``) for float32 inputs.
* ``pow2_scale`` (and ``scale_dtype='e8m0'``) round ``s`` *up* to a power of two; a float16 /
  bfloat16 / e4m3 ``scale_dtype`` rounds ``s`` up to a value of that dtype (saturating at the
  dtype's max).  Rounding up never narrows the clipping range, so in-range values stay within
  ``s / 2`` of their reconstruction (the top end may then use a code below ``qmax``).  Scales
  are returned as float32 tensors holding those values, so a later cast is lossless.
* Codes are ``torch.uint8`` for ranges inside ``[0, 255]``, ``torch.int8`` for other ranges inside
  ``[-128, 127]`` (so unsigned specs give uint8 and signed specs int8 for bits <= 8) and
  ``torch.int32`` otherwise.  Zero points are float32 tensors holding integers (exact), shaped
  like the scales.
* ``fake_quant_*`` use the clipped straight-through estimator: ``d x~ / d x = 1`` where
  ``qmin <= round(x / s) + z <= qmax`` and 0 where the value was clipped; scales and zero
  points get no gradient.

Spec level: ``quantize_int(x, spec)`` groups ``x`` with ``group_view`` and returns an
``IntQuantized`` whose codes have ``x``'s shape and whose scales / zeros have
``param_shape(layout)``; ``dequantize_int`` gives back ``x``'s shape and dtype.

Ranges must be finite (NaN / inf raise ``ValueError``).  Elementwise work runs in cache-sized row
chunks so that the chain of in-place ops touches main memory about once per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lowbit.core.ste import straight_through
from lowbit.core.granularity import GroupLayout, group_view, param_shape, ungroup
from lowbit.spec import QuantSpec

__all__ = [
    "IntQuantized",
    "int_range",
    "code_dtype",
    "compute_qparams",
    "quantize_affine",
    "dequantize_affine",
    "fake_quant_affine",
    "group_ranges",
    "quantize_int",
    "dequantize_int",
    "fake_quant_int",
]

EPS = torch.finfo(torch.float32).tiny
_CHUNK = 1 << 20  # elements per chunk (4 MiB of float32): cache-resident, few parallel regions
_SCALE_DTYPES = {
    None: None,
    "float32": None,
    torch.float32: None,
    "float16": torch.float16,
    torch.float16: torch.float16,
    "bfloat16": torch.bfloat16,
    torch.bfloat16: torch.bfloat16,
    "e4m3": torch.float8_e4m3fn,
    torch.float8_e4m3fn: torch.float8_e4m3fn,
    "e8m0": "pow2",
}
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}


# --------------------------------------------------------------------------- ranges / params
def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit signed or unsigned integer."""
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Code dtype for ``[qmin, qmax]``: uint8 if it fits and ``qmin >= 0``, else int8, else int32."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    return torch.int32


def _pow2_up(s: torch.Tensor) -> torch.Tensor:
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    return torch.where(mant == 0.5, s, torch.ldexp(torch.ones_like(s), exp))


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` that is >= ``s`` (saturating at the dtype's max)."""
    s = s.clamp(max=torch.finfo(dtype).max)
    y = s.to(dtype)
    low = y.float() < s
    if bool(low.any()):
        bits = y.view(_BITS_VIEW[dtype]).clone()
        bits[low] += 1  # positive finite values: next bit pattern is the next larger value
        y = bits.view(dtype)
    return y.float()


def _exact_top(lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, eps: float) -> torch.Tensor:
    """Lower ``s`` by ulps where float rounding would map ``hi`` below ``qmax``."""
    live = (hi > lo) & (s > eps)
    zero = torch.zeros_like(s)
    for _ in range(16):
        top = torch.round(hi / s) + (qmin - torch.round(lo / s))
        bad = live & (top < qmax)
        if not bool(bad.any()):
            break
        s = torch.where(bad, torch.nextafter(s, zero), s)
    return s


def compute_qparams(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    symmetric: bool,
    signed: bool,
    pow2_scale: bool = False,
    eps: float = EPS,
    scale_dtype: str | torch.dtype | None = None,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, broadcast shape of the ranges) for per-group ranges.

    Symmetric: ``s = absmax / (2^(b-1) - 1)``, or ``absmax / (2^(b-1) - 0.5)`` with ``full_range``.
    """
    xmin = torch.as_tensor(xmin).detach().float()
    xmax = torch.as_tensor(xmax).detach().float()
    xmin, xmax = torch.broadcast_tensors(xmin, xmax)
    if not (bool(torch.isfinite(xmin).all()) and bool(torch.isfinite(xmax).all())):
        raise ValueError("quantization range contains NaN or inf; the input must be finite")
    if bool((xmin > xmax).any()):
        raise ValueError("quantization range has xmin > xmax")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"unsupported scale_dtype {scale_dtype!r}; expected float32, float16, bfloat16, e4m3 or e8m0")
    rounding = _SCALE_DTYPES[scale_dtype]
    qmin, qmax = int_range(bits, signed)
    if symmetric:
        if bits < 2:
            raise ValueError("1-bit symmetric int quantization has no positive level; use asymmetric or 'binary'")
        levels = (1 << (bits - 1)) - (0.5 if full_range else 1)
        lo = torch.maximum(xmin.neg(), xmax)  # absmax
        hi = lo
        s = lo / levels
    else:
        lo = xmin.clamp(max=0.0)
        hi = xmax.clamp(min=0.0)
        s = (hi - lo) / (qmax - qmin)
    degenerate = (hi == 0) if symmetric else (hi == lo)
    s = torch.where(degenerate, torch.ones_like(s), s.clamp(min=eps))
    if pow2_scale or rounding == "pow2":
        s = _pow2_up(s)
    elif rounding is not None:
        s = _round_up_to(s, rounding)
    elif not symmetric:
        s = _exact_top(lo, hi, s, qmin, qmax, eps)
    if symmetric:
        zero = torch.full_like(s, 0.0 if signed else float(1 << (bits - 1)))
    else:
        zero = qmin - torch.round(lo / s)
    return s, zero


def spec_qparams(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_qparams`` with every grid option taken from an int ``spec``."""
    return compute_qparams(xmin, xmax, spec.bits, spec.symmetric, spec.signed, pow2_scale=spec.pow2_scale,
                           scale_dtype=spec.scale_dtype, full_range=spec.full_range)


# --------------------------------------------------------------------------- chunked kernels
def _split(t: torch.Tensor | None, x: torch.Tensor) -> Callable[[int, int], torch.Tensor | None]:
    """Row slicer for a parameter broadcast against ``x`` (sliced only along a shared dim 0)."""
    if t is None:
        return lambda a, b: None
    if t.dim() == x.dim() and t.shape[0] == x.shape[0] and x.shape[0] > 1:
        return lambda a, b: t[a:b]
    return lambda a, b: t


def _prep(x: torch.Tensor, params: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    """Flatten to 1-D for scalar parameters; otherwise keep ``x`` and check broadcasting."""
    ps = [None if p is None else torch.as_tensor(p, dtype=torch.float32, device=x.device) for p in params]
    if all(p is None or p.numel() == 1 for p in ps):
        # shape (1,), not (): a 0-dim float32 would not promote a bf16/fp16 input to float32
        return x.reshape(-1), [None if p is None else p.reshape(1) for p in ps]
    for p in ps:
        if p is not None and torch.broadcast_shapes(p.shape, x.shape) != x.shape:
            raise ValueError(f"parameters of shape {tuple(p.shape)} do not broadcast to the input {tuple(x.shape)}")
    return x, ps


def _run_chunks(kernel: Callable, x: torch.Tensor, params: list, outs: list[torch.Tensor]) -> None:
    """Apply ``kernel(x_chunk, *param_chunks, *out_chunks)`` over row chunks of ``x``."""
    n = x.shape[0] if x.dim() else 1
    if x.dim() == 0 or x.numel() == 0 or x.device.type != "cpu":
        kernel(x, *params, *outs)
        return
    per_row = max(1, x.numel() // n)
    step = max(1, _CHUNK // per_row)
    slicers = [_split(p, x) for p in params]
    for a in range(0, n, step):
        b = min(n, a + step)
        kernel(x[a:b], *(sl(a, b) for sl in slicers), *(o[a:b] for o in outs))


def _q_kernel(qmin: int, qmax: int) -> Callable:
    def k(xc, sc, zc, out):
        t = torch.div(xc, sc)
        t.round_()
        if zc is not None:
            t.add_(zc)
        t.clamp_(qmin, qmax)
        out.copy_(t)

    return k


def _dq_kernel(xc, sc, zc, out):
    if zc is None:
        t = torch.mul(xc, sc) if out.dtype != torch.float32 else torch.mul(xc, sc, out=out)
    elif out.dtype == torch.float32:
        t = torch.sub(xc, zc, out=out).mul_(sc)
    else:
        t = torch.sub(xc, zc).mul_(sc)
    if t is not out:
        out.copy_(t)


def _fq_kernel(qmin: int, qmax: int, with_mask: bool) -> Callable:
    def k(xc, sc, zc, out, *mask):
        t = torch.div(xc, sc)
        t.round_()
        if zc is not None:
            t.add_(zc)
        if with_mask:
            torch.ge(t, qmin, out=mask[0])
            mask[0].logical_and_(t <= qmax)
        t.clamp_(qmin, qmax)
        if zc is not None:
            t.sub_(zc)
        t.mul_(sc)
        out.copy_(t)

    return k


def _check_q(qmin: int, qmax: int) -> None:
    if qmin >= qmax:
        raise ValueError(f"need qmin < qmax, got [{qmin}, {qmax}]")


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, qmin, qmax)`` (int8 / uint8 / int32)."""
    _check_q(qmin, qmax)
    xv, (s, z) = _prep(x.detach(), [scale, zero])
    out = torch.empty(xv.shape, dtype=code_dtype(qmin, qmax), device=x.device)
    _run_chunks(_q_kernel(qmin, qmax), xv, [s, z], [out])
    return out.reshape(x.shape)


def dequantize_affine(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale * (q - zero)`` computed in float32 and returned as ``dtype``."""
    qv, (s, z) = _prep(q, [scale, zero])
    out = torch.empty(qv.shape, dtype=dtype, device=q.device)
    _run_chunks(_dq_kernel, qv, [s, z], [out])
    return out.reshape(q.shape)


@torch.no_grad()
def _fake_quant_kernel(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int,
                       need_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize-dequantize ``x`` in one chunked pass; with ``need_mask``, also where it fell in range."""
    xv, (s, z) = _prep(x, [scale, zero])
    out = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
    outs = [out, torch.empty(xv.shape, dtype=torch.bool, device=x.device)] if need_mask else [out]
    _run_chunks(_fq_kernel(qmin, qmax, need_mask), xv, [s, z], outs)
    return out.reshape(x.shape), outs[1].reshape(x.shape) if need_mask else None


def fake_quant_affine(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float | None, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize in ``x``'s dtype, with the clipped straight-through gradient."""
    _check_q(qmin, qmax)
    if zero is not None:
        zero = torch.as_tensor(zero, dtype=torch.float32, device=x.device).detach()
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).detach()
    need = x.requires_grad and torch.is_grad_enabled()
    out, in_range = _fake_quant_kernel(x.detach(), scale, zero, qmin, qmax, need)
    return straight_through(x, out, in_range) if need else out


# --------------------------------------------------------------------------- spec level
@dataclass
class IntQuantized:
    """Integer codes plus what is needed to dequantize them.

    ``q`` has the input's shape; ``scale`` / ``zero`` (float32) have ``param_shape(layout)``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    layout: GroupLayout
    bits: int
    signed: bool
    symmetric: bool
    dtype: torch.dtype

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]


def _check_spec(spec: QuantSpec) -> None:
    if spec.type != "int":
        raise ValueError(f"affine quantization needs an int QuantSpec, got type {spec.type!r}")


def _check_nonempty(x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")


def _group(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, GroupLayout]:
    return group_view(x, spec.granularity, spec.group_size, spec.block, spec.padding)  # type: ignore[arg-type]


def group_ranges(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(min, max)`` of a ``(G, E)`` group view, float32, shape ``(G,)``."""
    xg = xg.detach()
    if xg.shape[0] == 1:
        lo, hi = torch.aminmax(xg)  # global reduction is much faster than a dim reduction
        return lo.float().reshape(1), hi.float().reshape(1)
    return xg.amin(dim=1).float(), xg.amax(dim=1).float()  # two passes beat aminmax(dim) on CPU


def _as_groups(r: torch.Tensor | float, g: int, what: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(r, dtype=torch.float32, device=device).detach()
    if t.numel() == g:
        return t.reshape(g)
    try:
        return torch.broadcast_to(t.reshape(-1) if t.dim() > 1 else t, (g,))
    except RuntimeError:
        raise ValueError(f"{what} has {t.numel()} values but the input has {g} quantization groups") from None


def _params(
    xg: torch.Tensor, spec: QuantSpec, xmin: torch.Tensor | float | None, xmax: torch.Tensor | float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    g = xg.shape[0]
    if xmin is None or xmax is None:
        lo, hi = group_ranges(xg)
        xmin = lo if xmin is None else xmin
        xmax = hi if xmax is None else xmax
    lo, hi = _as_groups(xmin, g, "xmin", xg.device), _as_groups(xmax, g, "xmax", xg.device)
    s, z = spec_qparams(lo, hi, spec)
    return s.reshape(g, 1), z.reshape(g, 1)


def quantize_int(
    x: torch.Tensor,
    spec: QuantSpec,
    xmin: torch.Tensor | float | None = None,
    xmax: torch.Tensor | float | None = None,
) -> IntQuantized:
    """Quantize ``x`` with an int spec; ranges default to each group's min / max."""
    _check_spec(spec)
    _check_nonempty(x)
    xg, layout = _group(x.detach(), spec)
    s, z = _params(xg, spec, xmin, xmax)
    q = quantize_affine(xg, s, z, spec.qmin, spec.qmax)
    shape = param_shape(layout)
    return IntQuantized(
        ungroup(q, layout), s.reshape(shape), z.reshape(shape), layout, spec.bits, spec.signed, spec.symmetric, x.dtype
    )


def dequantize_int(qt: IntQuantized) -> torch.Tensor:
    """Reconstruct the tensor (original shape and dtype) from an ``IntQuantized``."""
    lay = qt.layout
    qg, _ = group_view(qt.q, lay.kind, lay.group_size, lay.block, "pad")  # type: ignore[arg-type]
    g = qg.shape[0]
    xg = dequantize_affine(qg, qt.scale.reshape(g, 1), qt.zero.reshape(g, 1), qt.dtype)
    return ungroup(xg, lay)


def fake_quant_int(
    x: torch.Tensor,
    spec: QuantSpec,
    xmin: torch.Tensor | float | None = None,
    xmax: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (same shape and dtype) with the clipped STE gradient."""
    _check_spec(spec)
    _check_nonempty(x)
    xg, layout = _group(x, spec)
    s, z = _params(xg, spec, xmin, xmax)
    return ungroup(fake_quant_affine(xg, s, z, spec.qmin, spec.qmax), layout)
