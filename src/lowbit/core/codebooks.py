"""Non-uniform (codebook) quantization: NF4, k-means/LUT, log (power-of-two), binary, ternary, BCQ.

Every quantizer here works on the ``(G, E)`` view of :func:`lowbit.core.granularity.group_view`:
one set of parameters (scale, LUT or BCQ alphas) per row.  Codes are ``uint8`` (one code per
element, ``spec.bits`` of it meaningful); computation is fp32 whatever the input dtype, and
:func:`dequantize_codebook` returns the input's shape and dtype.

What ``CodebookQuantized`` holds, per ``spec.fmt``:

========  =========================  ===========================  ================================
fmt       codes (G, E) uint8         codebook                     scales (G,)
========  =========================  ===========================  ================================
nf4       index into 16 NF4 levels   (16,) shared NF4 constant    absmax (or ``dq`` when doubled)
kmeans    index into the row's LUT   (G, 2^bits) per-row LUT      ``None``
log       index into pow2 levels     (2^bits - 1,) shared levels  int8 exponent ``e``: 2^e per row
binary    0 -> -1, 1 -> +1           (2,) ``[-1, 1]``             alpha = mean|x|
ternary   0 -> -1, 1 -> 0, 2 -> +1   (3,) ``[-1, 0, 1]``          alpha (TWN)
bcq       bit i set -> B_i = +1      (G, q) alphas                ``None``
========  =========================  ===========================  ================================

Shared codebooks are format constants and are not counted by :func:`storage_bits_per_weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core.ste import straight_through
from lowbit.core.granularity import GroupLayout, group_view, ungroup, valid_mask
from lowbit.spec import CODEBOOK_FORMATS, QuantSpec

__all__ = [
    "NF4_LEVELS",
    "NF4_OFFSET",
    "CodebookQuantized",
    "DoubleQuantScales",
    "bcq_fit",
    "bcq_greedy",
    "bcq_planes",
    "binary_rows",
    "dequantize_codebook",
    "derive_nf4_levels",
    "double_quantize",
    "fake_quant_codebook",
    "kmeans_rows",
    "log_levels",
    "log_rows",
    "nearest_level",
    "nf4_levels",
    "nf4_rows",
    "quantize_codebook",
    "storage_bits_per_weight",
    "ternary_rows",
]

# The 16 NF4 levels as published in QLoRA / bitsandbytes (``create_normal_map``), exact fp32.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# Outermost quantile used by bitsandbytes: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), as written
# there (the unrounded 0.96770833... gives levels within 3e-7 of the published ones).
NF4_OFFSET = 0.9677083
CODEBOOK_FMTS: tuple[str, ...] = tuple(CODEBOOK_FORMATS)
_FLOAT_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHARED = ("nf4", "log", "binary", "ternary")
_DQ_FMTS = ("nf4", "binary", "ternary")


# ---------------------------------------------------------------------------------- levels
def nf4_levels(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 published NF4 levels, ascending, fp32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def derive_nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4 from normal quantiles (QLoRA): 8 positive and 7 negative quantiles plus an exact zero.

    Each half takes the standard-normal quantiles of ``linspace(offset, 0.5)`` (dropping 0.5),
    the union is normalised to ``[-1, 1]``; this follows bitsandbytes step by step (fp32
    linspace, fp64 quantiles, fp32 normalisation), which reproduces :data:`NF4_LEVELS` exactly.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return v / v.max()


def log_levels(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Power-of-two levels relative to the group's max exponent, ascending, fp32.

    ``bits >= 2``: one sign bit, ``M = 2^(bits-1) - 1`` magnitudes ``2^0 .. 2^-(M-1)`` and zero
    (``2^bits - 1`` levels).  ``bits == 1``: ``{-1, +1}``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"log levels need 1 <= bits <= 8, got {bits}")
    if bits == 1:
        return torch.tensor([-1.0, 1.0], device=device)
    mags = torch.exp2(-torch.arange(2 ** (bits - 1) - 1, dtype=torch.float32))
    return torch.cat([-mags, torch.zeros(1), mags.flip(0)]).to(device)


# ---------------------------------------------------------------------------------- nearest
def _boundaries(levels: torch.Tensor) -> torch.Tensor:
    """fp32 boundaries ``m`` between sorted levels: ``v <= m`` iff ``v`` is at least as close to
    the lower level (exact for fp32 ``v``; ties go to the lower level, as ``argmin`` does)."""
    lo, hi = levels[..., :-1].double(), levels[..., 1:].double()
    mid = (lo + hi) * 0.5
    m = mid.float()
    return torch.where(m.double() > mid, torch.nextafter(m, torch.full_like(m, -math.inf)), m)


def nearest_level(v: torch.Tensor, levels: torch.Tensor, assume_sorted: bool = False) -> torch.Tensor:
    """Index (int64) of the nearest level for each element of ``v`` (fp32, ``(G, E)``).

    ``levels`` is either one shared ascending table ``(K,)`` or one table per row ``(G, K)``
    (sorted internally unless ``assume_sorted``).  Binary search against midpoints, no
    ``K``-wide broadcast; ties resolve to the lower level.
    """
    if levels.dim() == 1:
        return torch.bucketize(v, _boundaries(levels)).long()
    if assume_sorted:
        return torch.searchsorted(_boundaries(levels), v.contiguous()).long()
    sorted_levels, perm = levels.sort(dim=1, stable=True)
    idx = torch.searchsorted(_boundaries(sorted_levels), v.contiguous())
    return perm.gather(1, idx)


def _nearest_shared_u8(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``nearest_level`` for a shared table of at most 256 levels, straight to uint8 codes."""
    return torch.bucketize(v, _boundaries(levels), out_int32=True).to(torch.uint8)


def _lookup(levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``levels[codes]`` for a shared table (``index_select`` on int32 is the fastest gather)."""
    return torch.index_select(levels, 0, codes.reshape(-1).int()).reshape(codes.shape)


def _gather_rows(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[g, codes[g, e]]`` for a per-row table ``(G, K)``."""
    return table.gather(1, codes.long())


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


# ---------------------------------------------------------------------------------- double quant
@dataclass
class DoubleQuantScales:
    """Block scales quantized once more (QLoRA double quantization).

    ``scale ~ offset + codes * step[block]``: the mean ``offset`` is subtracted, the centred
    scales are coded as symmetric signed ints of ``bits`` with one fp32 absmax-derived ``step``
    per ``group_size`` consecutive scales.  (QLoRA codes them as 8-bit *floats*; signed int with
    the same mean offset and second-level blocks is the documented choice here.)
    """

    codes: torch.Tensor  # int8 (G,)
    steps: torch.Tensor  # fp32 (ceil(G / group_size),)
    offset: torch.Tensor  # fp32 (1,)
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The fp32 block scales ``(G,)``."""
        steps = self.steps.repeat_interleave(self.group_size)[: self.codes.numel()]
        return self.offset + self.codes.float() * steps

    def storage_bits(self) -> int:
        """Bits held: codes at ``bits`` each, fp32 steps and offset."""
        return self.codes.numel() * self.bits + 32 * (self.steps.numel() + self.offset.numel())


def double_quantize(scales: torch.Tensor, bits: int = 8, group_size: int = 256) -> DoubleQuantScales:
    """Quantize fp32 block scales ``(G,)`` to ``bits`` in second-level blocks of ``group_size``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"double quantization needs 2 <= bits <= 8 (signed int codes), got {bits}")
    s = scales.float().reshape(-1)
    offset = s.mean().reshape(1)
    c = s - offset
    n = c.numel()
    padded = torch.nn.functional.pad(c, (0, (-n) % group_size)).reshape(-1, group_size)
    qmax = 2 ** (bits - 1) - 1
    steps = padded.abs().amax(dim=1) / qmax
    codes = torch.round(padded / _safe(steps)[:, None]).clamp(-qmax, qmax)
    return DoubleQuantScales(codes.reshape(-1)[:n].to(torch.int8), steps, offset, bits, group_size)


# ---------------------------------------------------------------------------------- result
@dataclass
class CodebookQuantized:
    """A codebook-quantized tensor; see the module docstring for what each field holds."""

    codes: torch.Tensor
    codebook: torch.Tensor
    scales: torch.Tensor | None
    layout: GroupLayout
    spec: QuantSpec
    dtype: torch.dtype
    dq: DoubleQuantScales | None = None

    @property
    def shared_codebook(self) -> bool:
        """Whether ``codebook`` is a format constant rather than stored per group."""
        return self.spec.fmt in _SHARED

    def group_scales(self) -> torch.Tensor | None:
        """fp32 per-group multipliers ``(G, 1)`` (double quantization undone, ``2^e`` for log)."""
        if self.dq is not None:
            return self.dq.dequantize()[:, None]
        if self.scales is None:
            return None
        if self.spec.fmt == "log":
            return torch.exp2(self.scales.float())[:, None]
        return self.scales.float()[:, None]


# ---------------------------------------------------------------------------------- per-format
def _rows_mean(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return v.mean(dim=1)
    return (v * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-30)


def nf4_rows(xg: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes ``(G, E)`` uint8 and absmax ``(G,)``; pass ``scales`` to code against given ones."""
    if scales is None:
        scales = xg.abs().amax(dim=1)
    return _nearest_shared_u8(xg / _safe(scales)[:, None], nf4_levels(xg.device)), scales


def _log_code(xg: torch.Tensor, levels: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level codes for max exponents ``e`` ``(G,)`` and the squared error per row."""
    scale = torch.exp2(e.float())[:, None]  # exact powers of two (2^-128 is a subnormal)
    codes = _nearest_shared_u8(xg / scale, levels)
    return codes, (_lookup(levels, codes) * scale - xg).square().sum(dim=1)


def log_rows(xg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log codes ``(G, E)`` uint8 and int8 max exponents ``(G,)``.

    The max exponent ``e`` is searched over ``floor(log2 absmax) + 1`` down to ``- 2`` (four
    candidates; clipping the top can pay off, and for 1 bit the best ``2^e`` is near mean|x|),
    keeping the lowest squared error per group.
    """
    levels = log_levels(bits, xg.device)
    amax = xg.abs().amax(dim=1)
    e0 = torch.frexp(amax).exponent - 1
    e0 = torch.where(amax > 0, e0, torch.full_like(e0, -128))
    best_e = (e0 + 1).clamp(-128, 127)
    best_codes, best_err = _log_code(xg, levels, best_e)
    for d in (0, -1, -2):
        e = (e0 + d).clamp(-128, 127)
        codes, err = _log_code(xg, levels, e)
        take = err < best_err
        best_codes = torch.where(take[:, None], codes, best_codes)
        best_e = torch.where(take, e, best_e)
        best_err = torch.where(take, err, best_err)
    return best_codes, best_e.to(torch.int8)


def binary_rows(xg: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """XNOR-Net binary: codes ``x >= 0`` (uint8) and the optimal alpha = mean|x| ``(G,)``."""
    return (xg >= 0).to(torch.uint8), _rows_mean(xg.abs(), mask)


def ternary_rows(xg: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN ternary: threshold 0.7 mean|x|, alpha = mean |x| above it; codes ``sign + 1``."""
    a = xg.abs()
    delta = 0.7 * _rows_mean(a, mask)
    big = (a > delta[:, None]).float()
    if mask is not None:
        big = big * mask
    alpha = (a * big).sum(dim=1) / big.sum(dim=1).clamp_min(1.0)
    codes = torch.where(big > 0, torch.sign(xg) + 1, torch.ones_like(xg))
    return codes.to(torch.uint8), alpha


def _weighted_quantiles(xg: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the first sorted value whose cumulative weight reaches ``(j + 0.5) / k`` of the
    row's total, ``j = 0..k-1``: ``(G, k)`` ascending."""
    vals, order = xg.sort(dim=1)
    cum = w.gather(1, order).cumsum(dim=1)
    frac = (torch.arange(k, device=xg.device, dtype=xg.dtype) + 0.5) / k
    targets = (frac[None, :] * cum[:, -1:]).contiguous()
    pos = torch.searchsorted(cum.contiguous(), targets).clamp(max=xg.shape[1] - 1)
    return vals.gather(1, pos)


def _lloyd(xg: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, iters: int) -> torch.Tensor:
    """Weighted Lloyd steps on every row at once from a sorted ``lut``; returns the sorted LUT."""
    wx = w * xg
    for _ in range(iters):
        codes = nearest_level(xg, lut, assume_sorted=True)
        num = torch.zeros_like(lut).scatter_add_(1, codes, wx)
        den = torch.zeros_like(lut).scatter_add_(1, codes, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-30), lut).sort(dim=1).values
        if torch.equal(new, lut):
            break
        lut = new
    return lut


def _lut_error(xg: torch.Tensor, w: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Weighted squared error per row of nearest-centroid coding with ``lut``."""
    y = lut.gather(1, nearest_level(xg, lut, assume_sorted=True))
    return ((y - xg).square() * w).sum(dim=1)


def kmeans_rows(
    xg: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 20,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means (Lloyd) on every row at once: codes ``(G, E)`` uint8, LUT ``(G, k)``.

    Init: the row's weighted quantiles at ``(j + 0.5) / k``.  Each step assigns every element
    to its nearest centroid (binary search) and moves centroids to the weighted mean of their
    elements (an empty cluster keeps its centroid); stops after ``iters`` steps or when stable.
    With importance ``weights``, a second weighted run warm-starts from the unweighted solution
    and each row keeps the run with the lower weighted error, so the weighted fit is never worse
    (in weighted error) than the plain one.  ``mask`` (0 on padding) multiplies every weight.
    """
    if not 1 <= k <= 256:
        raise ValueError(f"k-means needs 1 <= k <= 256 centroids (uint8 codes), got {k}")
    base = torch.ones_like(xg) if mask is None else mask
    w = base if weights is None else weights * base
    lut = _lloyd(xg, w, _weighted_quantiles(xg, w, k), iters)
    if weights is not None:
        plain = _lloyd(xg, base, _weighted_quantiles(xg, base, k), iters)
        warm = _lloyd(xg, w, plain, iters)
        better = _lut_error(xg, w, warm) < _lut_error(xg, w, lut)
        lut = torch.where(better[:, None], warm, lut)
    codes = nearest_level(xg, lut, assume_sorted=True)
    return codes.to(torch.uint8), lut


# ---------------------------------------------------------------------------------- BCQ
def _bcq_signs(q: int, device: torch.device) -> torch.Tensor:
    """``(2^q, q)`` matrix of +-1: row ``c`` holds ``B_i = +1`` where bit ``i`` of ``c`` is set."""
    c = torch.arange(2**q, device=device)[:, None]
    return (((c >> torch.arange(q, device=device)) & 1) * 2 - 1).float()


def _bcq_table(alphas: torch.Tensor) -> torch.Tensor:
    """Values of all ``2^q`` sign combinations per row: ``(G, 2^q)``."""
    return alphas @ _bcq_signs(alphas.shape[1], alphas.device).T


def _bcq_error(xg: torch.Tensor, codes: torch.Tensor, alphas: torch.Tensor, w: torch.Tensor | None) -> float:
    d = (_gather_rows(_bcq_table(alphas), codes) - xg).square()
    return float((d if w is None else d * w).sum())


def bcq_greedy(xg: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy BCQ: ``B_i = sign(r)``, ``alpha_i = mean|r|``, ``r -= alpha_i B_i``; codes, alphas."""
    r = xg.clone()
    codes = torch.zeros_like(xg, dtype=torch.long)
    alphas = []
    for i in range(q):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(dim=1)
        r -= a[:, None] * b
        codes |= (b > 0).long() << i
        alphas.append(a)
    return codes, torch.stack(alphas, dim=1)


def _bcq_lstsq(xg: torch.Tensor, codes: torch.Tensor, q: int, w: torch.Tensor | None) -> torch.Tensor:
    """Least-squares alphas ``(G, q)`` for fixed sign planes (min-norm when the planes are
    dependent)."""
    b = (((codes[..., None] >> torch.arange(q, device=xg.device)) & 1) * 2 - 1).float()  # (G, E, q)
    wb = b if w is None else b * w[..., None]
    gram = (wb.transpose(1, 2) @ b).double()
    rhs = (wb.transpose(1, 2) @ xg[..., None]).double()
    return (torch.linalg.pinv(gram) @ rhs).squeeze(-1).float()


def bcq_fit(
    xg: torch.Tensor, q: int, iters: int = 10, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Binary-coding quantization ``x ~ sum_i alpha_i B_i`` per row (LUT-GEMM format).

    Greedy init, then ``iters`` alternating steps: least-squares alphas given the sign planes,
    then the best planes given the alphas (nearest of the ``2^q`` combinations).  Returns codes
    ``(G, E)`` uint8 (bit ``i`` = plane ``i``), alphas ``(G, q)`` and the (weighted) squared
    error after the greedy init and after every step, which never increases.
    """
    if not 1 <= q <= 8:
        raise ValueError(f"BCQ needs 1 <= q <= 8 planes (uint8 codes), got {q}")
    codes, alphas = bcq_greedy(xg, q)
    history = [_bcq_error(xg, codes, alphas, weights)]
    for _ in range(iters):
        alphas = _bcq_lstsq(xg, codes, q, weights)
        new = nearest_level(xg, _bcq_table(alphas))
        history.append(_bcq_error(xg, new, alphas, weights))
        if torch.equal(new, codes):
            break
        codes = new
    return codes.to(torch.uint8), alphas, history


def bcq_planes(qt: CodebookQuantized) -> torch.Tensor:
    """The sign planes ``B_i`` of a BCQ tensor as int8 ``(q, G, E)`` of +-1."""
    q = qt.codebook.shape[1]
    bits = (qt.codes.long()[None] >> torch.arange(q, device=qt.codes.device)[:, None, None]) & 1
    return (bits * 2 - 1).to(torch.int8)


# ---------------------------------------------------------------------------------- dispatch
def _padding_mask(x: torch.Tensor, spec: QuantSpec, layout: GroupLayout) -> torch.Tensor | None:
    """1 for real elements, 0 for the fill that ``padding='pad'`` added; ``None`` if no fill."""
    return valid_mask(layout, x.device)


def _view(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, GroupLayout]:
    return group_view(x, spec.granularity, spec.group_size, spec.block, spec.padding)  # type: ignore[arg-type]


def _grouped_weights(weights: torch.Tensor | None, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """Importance weights broadcast to ``x`` and laid out as its ``(G, E)`` view."""
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
    try:
        w = torch.broadcast_to(w, x.shape)
    except RuntimeError as err:
        msg = f"weights of shape {tuple(w.shape)} do not broadcast to the tensor {tuple(x.shape)}"
        raise ValueError(msg) from err
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite and non-negative (e.g. a Hessian diagonal)")
    return _view(w.contiguous(), spec)[0]


def _check_spec(spec: QuantSpec, weights: torch.Tensor | None) -> None:
    if spec.type != "codebook" or spec.fmt not in CODEBOOK_FMTS:
        raise ValueError(
            f"codebook quantization needs type='codebook' and fmt in {CODEBOOK_FMTS}, got {spec.type}/{spec.fmt}"
        )
    if spec.fmt != "log" and spec.scale_dtype not in _FLOAT_SCALE_DTYPES:
        raise ValueError(
            f"codebook scales/LUTs are stored as float32, float16 or bfloat16, not {spec.scale_dtype}"
        )
    if spec.pow2_scale or spec.global_scale:
        raise ValueError("pow2_scale and global_scale are not supported for codebook formats (use fmt='log')")
    if spec.double_quant is not None and spec.fmt not in _DQ_FMTS:
        raise ValueError(f"double_quant applies to the fp scales of {', '.join(_DQ_FMTS)}, not to {spec.fmt}")
    if weights is not None and spec.fmt not in ("kmeans", "bcq"):
        raise ValueError(f"importance weights are used by kmeans and bcq only, not by {spec.fmt}")


def _store(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round scales/LUTs to ``spec.scale_dtype`` (kept in that dtype)."""
    return t.to(_FLOAT_SCALE_DTYPES[spec.scale_dtype])


def _scaled_rows(
    xg: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, DoubleQuantScales | None]:
    """nf4 / binary / ternary: codes, shared codebook, stored scales and optional double quant."""
    fmt = spec.fmt
    codes: torch.Tensor | None = None
    if fmt == "nf4":
        scales = xg.abs().amax(dim=1)
        levels = nf4_levels(xg.device)
    elif fmt == "binary":
        codes, scales = binary_rows(xg, mask)
        levels = torch.tensor([-1.0, 1.0], device=xg.device)
    else:
        codes, scales = ternary_rows(xg, mask)
        levels = torch.tensor([-1.0, 0.0, 1.0], device=xg.device)
    dq = None
    if spec.double_quant is not None:
        dq = double_quantize(scales, *spec.double_quant)
        used, stored = dq.dequantize(), None
    else:
        stored = _store(scales, spec)
        used = stored.float()
    if codes is None:  # NF4 codes are chosen against the scale actually stored
        codes = nf4_rows(xg, used)[0]
    return codes, levels, stored, dq


def quantize_codebook(
    x: torch.Tensor, spec: QuantSpec, *, weights: torch.Tensor | None = None, iters: int | None = None
) -> CodebookQuantized:
    """Quantize ``x`` (fp32/bf16/fp16) to the codebook format ``spec.fmt`` at ``spec.granularity``.

    ``weights`` (kmeans, bcq): non-negative importance broadcastable to ``x`` (e.g. a Hessian
    diagonal per column, or per element).  ``iters``: Lloyd steps (kmeans, default 20) or
    alternating steps (bcq, default 10).  ``spec.scale_dtype`` (float32/float16/bfloat16) sets
    how scales, LUTs and alphas are stored; log always stores int8 exponents.  ``spec.observer``
    is not used: ranges come from the format itself (absmax, mean|x|, max exponent, k-means,
    least squares).
    """
    _check_spec(spec, weights)
    xf = x.detach().float()
    xg, layout = _view(xf, spec)
    mask = _padding_mask(xf, spec, layout)
    fmt = spec.fmt
    dq = None
    if fmt in _DQ_FMTS:
        codes, codebook, scales, dq = _scaled_rows(xg, spec, mask)
    elif fmt == "log":
        codes, scales = log_rows(xg, spec.bits)
        codebook = log_levels(spec.bits, xg.device)
    elif fmt == "kmeans":
        w = _grouped_weights(weights, xf, spec)
        _, lut = kmeans_rows(xg, 2**spec.bits, w, 20 if iters is None else iters, mask)
        codebook, scales = _store(lut, spec), None  # rounding keeps the LUT sorted
        codes = nearest_level(xg, codebook.float(), assume_sorted=True).to(torch.uint8)
    else:
        w = _grouped_weights(weights, xf, spec)
        w = mask if w is None else (w if mask is None else w * mask)
        codes, alphas, _ = bcq_fit(xg, spec.bits, 10 if iters is None else iters, w)
        codebook, scales = _store(alphas, spec), None
        if codebook.dtype != torch.float32:  # re-pick the planes for the rounded alphas
            codes = nearest_level(xg, _bcq_table(codebook.float())).to(torch.uint8)
    return CodebookQuantized(codes, codebook, scales, layout, spec, x.dtype, dq)


def dequantize_codebook(qt: CodebookQuantized) -> torch.Tensor:
    """Reconstruct the tensor in its original shape and dtype."""
    fmt = qt.spec.fmt
    if fmt == "kmeans":
        xg = _gather_rows(qt.codebook.float(), qt.codes)
    elif fmt == "bcq":
        xg = _gather_rows(_bcq_table(qt.codebook.float()), qt.codes)
    else:
        s = qt.group_scales()
        assert s is not None
        xg = _lookup(qt.codebook, qt.codes).mul_(s)
    return ungroup(xg, qt.layout).to(qt.dtype)


def fake_quant_codebook(
    x: torch.Tensor, spec: QuantSpec, *, weights: torch.Tensor | None = None, iters: int | None = None
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (identity backward)."""
    y = dequantize_codebook(quantize_codebook(x, spec, weights=weights, iters=iters))
    return straight_through(x, y)


def storage_bits_per_weight(qt: CodebookQuantized) -> float:
    """Bits held per original element: codes at ``spec.bits`` each, per-group LUTs/alphas and
    scales at their stored dtype widths, double-quant codes, steps and offset.  Shared
    codebooks (format constants) are not counted."""
    bits = qt.codes.numel() * qt.spec.bits
    if not qt.shared_codebook:
        bits += qt.codebook.numel() * qt.codebook.element_size() * 8
    if qt.scales is not None:
        bits += qt.scales.numel() * qt.scales.element_size() * 8
    if qt.dq is not None:
        bits += qt.dq.storage_bits()
    return bits / math.prod(qt.layout.shape)
