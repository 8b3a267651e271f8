"""SpQR (Dettmers et al., 2023): small groups, 3-bit group statistics, and fp16 outliers in CSR.

The GPTQ column sweep (``lowbit.solvers.hessian.solve``, with the column format ``SpQRColumns``) with three changes, following the reference code
(``spqr_engine.py``):

* **Small groups** of ``group_size`` (16) consecutive input columns of the sweep order, one
  scale and zero point per output row and group.  Zero points are fractional (``z = qmin - min/s``,
  the reference's ``round_zero=False``); symmetric specs use the fixed mid-point zero of the spec.
* **Bilevel statistics**: for every group, the ``out`` scales (and zeros) are quantized to
  ``stat_bits`` (3) bits, asymmetric min-max, in chunks of ``stat_group`` (16) consecutive output
  rows, each chunk with its own fp16 scale and fp16 zero.  The weights are then quantized with the
  dequantized statistics.
* **Unstructured outliers**: with ``d_j = U_jj`` (``U`` the upper Cholesky factor of ``H^-1``) and
  ``tau = outlier_threshold * mean_j(Var_rows(W_{:,j}) / d_j^2)``, a weight whose GPTQ error
  ``((w - q(w)) / d_j)^2`` exceeds ``tau`` is kept in fp16 (its error is then zero).  Before a
  group's statistics are fitted, each weight's leave-one-out benefit (how much the group's
  ``d``-weighted squared error falls when that weight is excluded from the min-max fit) is compared
  with ``tau``; the likely outliers are replaced by their row's mean for the fit, so they do not
  stretch the range (``simplified_outliers=True`` skips this).

Outliers are stored in CSR over the original ``(out, in)`` layout: fp16 values, int16 column
indices (int32 beyond 32768 columns) and ``out + 1`` int32 row pointers.  Their positions in the
dense code matrix hold the code of 0; a kernel *replaces* those weights by the CSR values.

Exact storage per layer (``spqr_bits``): ``bits`` per weight (dense codes), ``stat_bits`` per
group scale (and zero, if asymmetric), two fp16 per stat chunk of scales (and of zeros), the CSR
arrays and, with act-order, the column permutation (one column index per input column).  At the
defaults (3-bit, 16, 3-bit stats in 16s, asymmetric) that is ``3 + 6/16 + 64/256 = 3.625`` bits
plus ~32 bits per outlier, the reference's ``get_average_number_of_bits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lowbit.core.affine import code_dtype
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.packed.intweight import OUTLIERS_REFUSAL
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.solvers.affine import check_int_spec
from lowbit.solvers.hessian import act_order as act_order_perm
from lowbit.solvers.hessian import prepare, solve
from lowbit.solvers.storage import FP16_BITS, CodeBlock, bits_per_weight
from lowbit.spec import QuantSpec

FP_BITS = FP16_BITS  # outlier values and second-level statistics are fp16
PTR_BITS = 32  # CSR row pointers
_TINY = torch.finfo(torch.float32).tiny


def index_bits(n: int) -> int:
    """Width of a stored column index for ``n`` columns: int16 up to 32768 columns, else int32."""
    return 16 if n <= 1 << 15 else 32


# --------------------------------------------------------------------------- CSR
@dataclass
class CSR:
    """Sparse ``(rows, cols)`` matrix: ``values[row_ptr[r]:row_ptr[r+1]]`` sit at ``col_idx[...]`` of row ``r``."""

    row_ptr: torch.Tensor  # (rows + 1,) int32
    col_idx: torch.Tensor  # (nnz,) int16 or int32
    values: torch.Tensor  # (nnz,) float16
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def storage_bits(self) -> int:
        return self.nnz * (FP_BITS + index_bits(self.shape[1])) + (self.shape[0] + 1) * PTR_BITS

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values as float32 in a dense matrix, mask)``."""
        rows, cols = self.shape
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        r = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
        c = self.col_idx.long()
        dense = torch.zeros(rows, cols, device=self.values.device)
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.values.device)
        dense[r, c] = self.values.float()
        mask[r, c] = True
        return dense, mask


def to_csr(mask: torch.Tensor, values: torch.Tensor) -> CSR:
    """CSR of ``values`` (any float dtype, stored as fp16) at the True entries of ``mask``."""
    rows, cols = mask.shape
    r, c = mask.nonzero(as_tuple=True)  # row-major order, columns ascending within a row
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0).to(torch.int32)
    dtype = torch.int16 if index_bits(cols) == 16 else torch.int32
    # int16 holds 0..32767; 32768 columns never need index 32768
    return CSR(row_ptr, c.to(dtype), values[r, c].to(torch.float16), (rows, cols))


# --------------------------------------------------------------------------- statistics
def _fit(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero)`` over the last dim (fractional zero, symmetric: the spec's mid-point); constant rows get ``s = 0``."""
    lo, hi = x.amin(-1), x.amax(-1)
    if symmetric:
        s = torch.maximum(-lo, hi) / ((qmax - qmin) // 2)
        z = torch.full_like(s, (qmin + qmax + 1) / 2)
    else:
        s = (hi - lo) / (qmax - qmin)
        z = qmin - lo / torch.where(s > _TINY, s, torch.ones_like(s))
    return s, z


def _loo_benefit(gw: torch.Tensor, d: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    """Per weight: fall in the group's ``sum((w - q(w)) / d)^2`` when that weight is left out of the fit (and unquantized)."""
    rows, g = gw.shape
    if g < 2:
        return torch.zeros_like(gw)
    idx = torch.arange(g, device=gw.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).to(idx.dtype)  # (g, g-1): row i lists every column but i
    data = gw[:, loo]  # (rows, g, g-1)
    rec = _qdq(data, *_safe(_fit(data, qmin, qmax, symmetric)), qmin, qmax)
    loo_err = ((rec - data) / d[loo]).square().sum(-1)  # (rows, g)
    base = _qdq(gw, *_safe(_fit(gw, qmin, qmax, symmetric)), qmin, qmax)
    base_err = ((base - gw) / d).square().sum(-1, keepdim=True)
    return base_err - loo_err


def _without_likely_outliers(gw: torch.Tensor, d: torch.Tensor, tau: float, qmin: int, qmax: int, symmetric: bool,
                             ) -> torch.Tensor:
    """The group with each weight whose leave-one-out benefit exceeds ``tau`` replaced by its row's mean of the rest."""
    likely = _loo_benefit(gw, d, qmin, qmax, symmetric) > tau
    keep = (~likely).float()
    mean = (gw * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return torch.where(likely, mean, gw)


def _fit_group(gw: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_fit`` per row; constant rows (e.g. dead columns) borrow the group's mean scale."""
    s, z = _fit(gw, qmin, qmax, symmetric)
    ok = s > _TINY
    if not bool(ok.all()):
        fill = s[ok].mean() if bool(ok.any()) else torch.ones((), device=s.device)
        s = torch.where(ok, s, fill)
        if not symmetric:
            z = torch.where(ok, z, qmin - gw.amin(1) / s)
    return s, z


def _safe(sz: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale 1 for constant rows (``_fit`` already gave them ``z = qmin - min``): they reconstruct exactly."""
    s, z = sz
    return torch.where(s > _TINY, s, torch.ones_like(s)), z


def _qdq(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    return s * (torch.clamp(torch.round(x / s + z), qmin, qmax) - z)


def quantize_stats(v: torch.Tensor, bits: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the vector ``v`` (one statistic per output row) to ``bits`` bits in chunks of ``chunk`` rows.

    Asymmetric min-max per chunk with an fp16 scale and an fp16 (fractional) zero; returns
    ``(dequantized v, codes uint8, chunk scales fp16, chunk zeros fp16)``.
    """
    n = v.numel()
    n_chunks = (n + chunk - 1) // chunk
    pad = n_chunks * chunk - n
    vp = torch.cat([v, v[-1:].expand(pad)]) if pad else v  # repeat the last value: no effect on min / max
    vc = vp.reshape(n_chunks, chunk)
    lo, hi = vc.amin(1), vc.amax(1)
    maxq = (1 << bits) - 1
    s2 = ((hi - lo) / maxq).to(torch.float16).float()
    s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))  # constant chunk: scale 1, the zero carries the value
    z2 = (-lo / s2).to(torch.float16).float()
    codes = torch.clamp(torch.round(vc / s2[:, None] + z2[:, None]), 0, maxq)
    deq = (s2[:, None] * (codes - z2[:, None])).reshape(-1)[:n]
    return deq, codes.reshape(-1)[:n].to(torch.uint8), s2.to(torch.float16), z2.to(torch.float16)


# --------------------------------------------------------------------------- the algorithm
@dataclass
class SpQRResult:
    """Dequantized weight and every stored part (original column order unless noted)."""

    weight: torch.Tensor  # (out, in) float32
    codes: torch.Tensor  # (out, in) uint8 / int8 (int32 beyond 8 bits) dense codes (code of 0 at outliers)
    scale: torch.Tensor  # (out, n_groups) dequantized first-level scales (what the weights use)
    zero: torch.Tensor  # (out, n_groups) dequantized first-level zeros
    scale_codes: torch.Tensor  # (out, n_groups) uint8, stat_bits each
    zero_codes: torch.Tensor | None  # (out, n_groups) uint8, or None for symmetric specs
    stat_scale: torch.Tensor  # (n_chunks, n_groups, 2) fp16 second-level (scale, zero) of the scales
    stat_zero: torch.Tensor | None  # (n_chunks, n_groups, 2) fp16 second-level (scale, zero) of the zeros
    g_idx: torch.Tensor  # (in,) int32 group of each column (groups follow the sweep order)
    perm: torch.Tensor  # (in,) sweep order
    outliers: CSR
    threshold: float  # absolute outlier threshold tau
    damp_used: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_outliers(self) -> int:
        return self.outliers.nnz


class SpQRColumns:
    """SpQR's column format: small groups with bilevel statistics, fp16 outliers by the GPTQ error test."""

    def __init__(self, spec: QuantSpec, perm: torch.Tensor, group: int, stat_bits: int, stat_group: int,
                 outlier_threshold: float, simplified_outliers: bool):
        self.qmin, self.qmax, self.sym = spec.qmin, spec.qmax, spec.symmetric
        self.order = perm.tolist()
        self.group, self.stat_bits, self.stat_group = group, stat_bits, stat_group
        self.outlier_threshold, self.simplified = float(outlier_threshold), simplified_outliers
        self.cur: list[torch.Tensor] = []  # dequantized (scale, zero) of the current group

    def begin(self, w: torch.Tensor, hinv: torch.Tensor) -> None:
        """Threshold ``tau`` from the un-updated weights and ``d = diag(U)``; empty stored parts."""
        rows, cols = w.shape
        n_groups = (cols + self.group - 1) // self.group
        n_chunks = (rows + self.stat_group - 1) // self.stat_group
        self.cols, self.d = cols, torch.diag(hinv)
        self.tau = self.outlier_threshold * (w.var(dim=0) / self.d.square()).mean().item()
        self.find_outliers = self.tau != float("inf")
        dev, u8, f16 = w.device, torch.uint8, torch.float16
        self.codes = torch.zeros(rows, cols, dtype=code_dtype(self.qmin, self.qmax), device=dev)
        self.scale = torch.zeros(rows, n_groups, device=dev)
        self.zero = torch.zeros(rows, n_groups, device=dev)
        self.scale_codes = torch.zeros(rows, n_groups, dtype=u8, device=dev)
        self.zero_codes = None if self.sym else torch.zeros(rows, n_groups, dtype=u8, device=dev)
        self.stat_scale = torch.zeros(n_chunks, n_groups, 2, dtype=f16, device=dev)
        self.stat_zero = None if self.sym else torch.zeros(n_chunks, n_groups, 2, dtype=f16, device=dev)
        self.outlier = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
        self.kept = torch.zeros(rows, cols, device=dev)  # fp16-rounded outlier values (sweep order)

    def group_start(self, col: int) -> int:
        return min(self.group, self.cols - col) if col % self.group == 0 else 0

    def fit_group(self, col: int, gw: torch.Tensor) -> None:
        """First-level min-max statistics (likely outliers left out), then their ``stat_bits`` codes."""
        g, sym = col // self.group, self.sym
        if self.find_outliers and not self.simplified:
            gw = _without_likely_outliers(gw, self.d[col : col + gw.shape[1]], self.tau, self.qmin, self.qmax, sym)
        s, z = _fit_group(gw, self.qmin, self.qmax, sym)
        s_hat, sc, s2, z2 = quantize_stats(s, self.stat_bits, self.stat_group)
        self.scale_codes[:, g] = sc
        self.stat_scale[:, g, 0], self.stat_scale[:, g, 1] = s2, z2
        if sym:
            z_hat = z
        else:
            z_hat, zc, s2z, z2z = quantize_stats(z, self.stat_bits, self.stat_group)
            self.zero_codes[:, g] = zc  # type: ignore[index]
            self.stat_zero[:, g, 0], self.stat_zero[:, g, 1] = s2z, z2z  # type: ignore[index]
        self.scale[:, g], self.zero[:, g] = s_hat, z_hat
        self.cur[:] = [s_hat, z_hat]

    def quantize(self, col: int, x: torch.Tensor) -> torch.Tensor:
        """Round to the group's grid; a weight whose error ``((x - q) / d)^2`` exceeds ``tau`` stays in fp16."""
        s, z = self.cur
        q = torch.clamp(torch.round(x / s.clamp(min=_TINY) + z), self.qmin, self.qmax)
        deq = s * (q - z)
        if self.find_outliers:
            is_out = ((x - deq) / self.d[col]).square() > self.tau
            if bool(is_out.any()):
                q0 = torch.clamp(torch.round(z), self.qmin, self.qmax)  # the code of 0
                q = torch.where(is_out, q0, q)
                xv = x.to(torch.float16).float()
                deq = torch.where(is_out, xv, deq)
                self.outlier[:, col] = is_out
                self.kept[:, col] = torch.where(is_out, xv, 0.0)
        self.codes[:, self.order[col]] = q.to(self.codes.dtype)
        return deq


def spqr_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    group_size: int = 16,
    stat_bits: int = 3,
    stat_group: int = 16,
    outlier_threshold: float = 0.2,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    simplified_outliers: bool = False,
) -> SpQRResult:
    """Run SpQR on one weight ``(out, in)`` with Hessian ``(in, in)``; pure tensor math."""
    check_int_spec(spec, "SpQR", granularities=None)  # groups come from group_size
    cols = weight.shape[1]
    # act-order on the raw diagonal: dead inputs (H_jj = 0) go last
    perm = act_order_perm(hessian) if act_order else torch.arange(cols, device=weight.device)
    w, h = prepare(weight, hessian)
    fmt = SpQRColumns(spec, perm, group_size, stat_bits, stat_group, outlier_threshold, simplified_outliers)
    sol = solve(w, h, fmt, perm, damp, block_size)
    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=w.device) // group_size).to(torch.int32)[inv]
    return SpQRResult(
        weight=sol.weight, codes=fmt.codes, scale=fmt.scale, zero=fmt.zero, scale_codes=fmt.scale_codes,
        zero_codes=fmt.zero_codes, stat_scale=fmt.stat_scale, stat_zero=fmt.stat_zero, g_idx=g_idx, perm=perm,
        outliers=to_csr(fmt.outlier[:, inv], fmt.kept[:, inv]), threshold=fmt.tau, damp_used=sol.damp,
    )


def spqr_dequantize(res: SpQRResult, spec: QuantSpec, stat_group: int = 16) -> torch.Tensor:
    """Rebuild the weight from the *stored* parts only (codes, stat codes, fp16 stat params, CSR)."""
    rows, cols = res.codes.shape
    chunk_of_row = torch.arange(rows, device=res.codes.device) // stat_group

    def stats(codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        p = params.float()[chunk_of_row]  # (rows, n_groups, 2)
        return p[..., 0] * (codes.float() - p[..., 1])

    s = stats(res.scale_codes, res.stat_scale)
    if res.zero_codes is None:
        z = torch.full_like(s, (spec.qmin + spec.qmax + 1) / 2)
    else:
        z = stats(res.zero_codes, res.stat_zero)  # type: ignore[arg-type]
    gi = res.g_idx.long().expand(rows, -1)
    w = s.gather(1, gi) * (res.codes.float() - z.gather(1, gi))
    vals, mask = res.outliers.to_dense()
    return torch.where(mask, vals, w)


def spqr_bits(
    rows: int, cols: int, bits: int, n_outliers: int, group_size: int = 16, stat_bits: int = 3,
    stat_group: int = 16, symmetric: bool = False, act_order: bool = True,
) -> float:
    """Exact stored bits per weight of a SpQR layer (see the module docstring)."""
    n_groups = (cols + group_size - 1) // group_size
    n_chunks = (rows + stat_group - 1) // stat_group
    n_stats = 1 if symmetric else 2  # scales, and zeros if asymmetric
    weights = CodeBlock(rows * cols, bits)
    # first-level statistics as codes; each chunk of them has an fp16 scale and an fp16 zero
    stats = CodeBlock(n_stats * rows * n_groups, stat_bits, n_stats * n_chunks * n_groups, FP_BITS, FP_BITS)
    positions = n_outliers * index_bits(cols) + (rows + 1) * PTR_BITS  # CSR
    if act_order:
        positions += cols * index_bits(cols)  # the column permutation
    return bits_per_weight(rows * cols, [weights, stats], n_outliers, FP_BITS, positions)


@register_method
@dataclass
class SpQR(WeightMethod):
    """SpQR: ``spec`` gives the base bits and symmetry; groups, statistics and outliers are options.

    ``group_size`` is the first-level group (the spec's granularity / group_size are not used; a
    group spec with another group size is rejected to avoid ambiguity).  ``outlier_threshold=0.2``,
    3-bit statistics in groups of 16 and act-order are the reference's near-lossless settings.  The
    reference README also uses ``damp=1.0``; on smollm2-135m (16 x 512 calibration tokens)
    ``damp=0.01`` gave a lower mean layer output error (0.0038 vs 0.0053) and 2-window perplexity
    (22.42 vs 22.75), so the default is GPTQ's 0.01.  ``perm`` overrides ``act_order`` with
    ``"act_order"`` or ``"identity"``.
    """

    group_size: int = bounded(16, ge=1)
    stat_bits: int = bounded(3, ge=1, le=8)
    stat_group: int = bounded(16, ge=1)
    outlier_threshold: float = bounded(0.2, gt=0, le=math.inf)  # inf: no outliers
    damp: float = bounded(0.01, gt=0)
    block_size: int = bounded(128, ge=1)
    act_order: bool = True
    perm: Literal["act_order", "identity"] | None = None
    simplified_outliers: bool = False

    name = "spqr"
    needs_hessian = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.type != "int":
            raise LowbitError(f"spqr quantizes to int grids; got a {self.spec.type} spec")
        if self.spec.granularity == "group" and self.spec.group_size != self.group_size:
            raise LowbitError(
                f"spqr: the spec's group_size {self.spec.group_size} differs from the option group_size "
                f"{self.group_size}; SpQR's groups come from the option (set both to the same value)"
            )

    @property
    def uses_act_order(self) -> bool:
        return self.perm == "act_order" if self.perm is not None else bool(self.act_order)

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        self.linear_weight(name, layer)  # no divisibility check: SpQR sets its own group size

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        self.require_hessian(name, stats)
        w = layer.weight.data
        rows, cols = w.shape
        act = self.uses_act_order
        res = spqr_quantize(w, stats.hessian, self.spec, self.group_size, self.stat_bits, self.stat_group,
                            self.outlier_threshold, self.damp, self.block_size, act, self.simplified_outliers)
        bits = spqr_bits(rows, cols, self.spec.bits, res.n_outliers, self.group_size, self.stat_bits,
                         self.stat_group, self.spec.symmetric, act)
        return LayerResult(
            weight=res.weight.to(w.dtype),
            bits_per_weight=bits,
            int_refusal=OUTLIERS_REFUSAL,
            artifacts={"codes": res.codes, "scale_codes": res.scale_codes, "zero_codes": res.zero_codes,
                       "stat_scale": res.stat_scale, "stat_zero": res.stat_zero, "g_idx": res.g_idx,
                       "perm": res.perm if act else None, "outliers": res.outliers, "threshold": res.threshold,
                       "damp": res.damp_used},
            extra_params=res.n_outliers,
        )


__all__ = ["SpQR", "SpQRResult", "CSR", "to_csr", "spqr_quantize", "spqr_dequantize", "spqr_bits", "quantize_stats"]
