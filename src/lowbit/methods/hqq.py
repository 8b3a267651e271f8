"""HQQ (Badri & Shaji, 2023): data-free Half-Quadratic Quantization of the zero point.

For an asymmetric int spec the scale ``s`` stays the min-max one of :mod:`lowbit.core.affine`
(as the reference implementation does by default) and the zero point ``z`` of each group is
optimised for a sparsity-promoting ``lp`` norm (``p < 1``) of the reconstruction error,
``min_z ||W - s (Q(W; s, z) - z)||_p^p``, by the half-quadratic splitting solver::

    W_q = clamp(round(W / s + z), qmin, qmax)         # codes for the current zero
    W_r = s (W_q - z)                                 # reconstruction
    W_e = shrink_lp(W - W_r, beta, p)                 # sparse error (generalised soft-threshold)
    z   = mean_group(W_q - (W - W_e) / s)             # closed-form zero update
    beta *= kappa

for up to ``iters`` steps.  No calibration data are used.

Conventions and choices (documented here once):

* **Zero-point convention.** The same as :mod:`lowbit.core.affine`: ``x~ = s (q - z)`` and, for
  an integer ``z``, ``q = clamp(round(x / s) + z)``.  HQQ's optimal zero is fractional, so codes
  are ``q = clamp(round(x / s + z))`` (identical to affine's rule for integer ``z``; the only
  rule that keeps codes integral otherwise) and ``lowbit.core.affine.dequantize_affine(q, s, z)``
  reconstructs the weight exactly as HQQ does.
* **The zero is stored as float16** (rounded to fp16 after every update, so the error that is
  measured is that of the stored value).  Bits per weight therefore count ``bits`` per code,
  the scale at the spec's ``scale_dtype`` width and **16 bits per zero** (an RTN asymmetric
  zero costs ``bits``).
* **Start and keep-best.** The start is the min-max scale and the zero ``qmin - min / s`` that maps
  the group's range onto ``[qmin, qmax]``, **rounded to an integer** (``round_zero``, the reference
  library's default at 4 bits, here at every width): a weight of exactly 0 then has a code, and the
  solver moves the zero off the integer only as far as the lp objective pays for.  Without the
  rounding (the reference's 3-bit default) most near-zero weights are off the grid and perplexity
  suffers: on smollm2-135m (g64, 10 x 2048 WikiText-2 test windows; ``hqq`` 0.2.8 in the same run)
  W4 25.72 unrounded, 24.68 rounded, the library 24.79; W3 170.6 unrounded, 67.6 rounded, the
  library 169.6 (RTN asymmetric: 26.35 / 69.13).  Every group keeps
  the parameters with its lowest squared reconstruction error seen over the iterations (the
  start included); the loop stops early, as in the reference, once the total error stops
  improving.  The lp objective drives the updates; the squared error picks what is kept,
  because that is what weight and output errors measure.
* **Symmetric specs.** Their zero is fixed by the format (0, or the midpoint of an unsigned
  range), so the same solver optimises the scale instead: with the shrunk target
  ``T = W - W_e`` the update is the least-squares ``s = <T, W_q - z> / ||W_q - z||^2``, rounded
  to the spec's ``scale_dtype`` (fp16/bf16/e4m3 to nearest, e8m0/``pow2_scale`` to the nearest
  power of two).  Bits are then exactly RTN's symmetric bits.
* Padding groups (``padding='pad'``) are masked out of every mean and error.

The unrounded start minimises the squared weight error better (W4 0.00553 vs 0.00562 relative) yet
loses perplexity: the error it saves sits on the largest weights, the one it adds on the many small
ones.  The shipped recipes store scales and zeros in fp16 (4.5 bits per weight at g64, as the library).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.core.affine import EPS, IntQuantized, code_dtype, dequantize_affine, spec_qparams
from lowbit.core.granularity import GroupLayout, group_view, param_shape, ungroup, valid_mask
from lowbit.errors import LowbitError
from lowbit.fields import bounded, check_values
from lowbit.methods.base import OPTIONS_ERROR, LayerResult, LayerStats, WeightMethod, register_method
from lowbit.spec import SCALE_BITS, QuantSpec

__all__ = ["HQQ", "HQQRows", "ZERO_BITS", "hqq_bits_per_weight", "hqq_codes", "hqq_quantize", "hqq_rows", "shrink_lp"]

ZERO_DTYPE = torch.float16
ZERO_BITS = 16


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-threshold ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (plain soft-threshold
    ``relu(|x| - 1/beta)`` for ``p = 1``); zeros stay zero."""
    ax = x.abs()
    thr = ax.pow(p - 1.0) if p != 1 else torch.ones_like(ax)  # inf at 0: relu(-inf) = 0
    return torch.sign(x) * torch.relu(ax - thr / beta)


# ---------------------------------------------------------------------------------- storage
def _store_zero(z: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(ZERO_DTYPE).max
    return z.clamp(-big, big).to(ZERO_DTYPE).float()


def _store_scale(s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round an optimised scale to a value the spec can store (nearest; floored at EPS)."""
    s = s.clamp(min=EPS)
    if spec.pow2_scale or spec.scale_dtype == "e8m0":
        return torch.exp2(torch.round(torch.log2(s)))
    if spec.scale_dtype == "float32":
        return s
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}[spec.scale_dtype]
    fi = torch.finfo(dtype)
    return s.clamp(fi.smallest_normal, fi.max).to(dtype).float()


# ---------------------------------------------------------------------------------- solver
@dataclass
class HQQRows:
    """Result of :func:`hqq_rows`: the kept parameters ``(G, 1)`` and the solver's trace."""

    scale: torch.Tensor
    zero: torch.Tensor
    history: list[float]  # total squared error of the start and after every update
    best_error: float  # total squared error of the kept (per-group best) parameters


def _codes(xg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.div(xg, s).add_(z).round_().clamp_(qmin, qmax)


_CHUNK = 1 << 18  # elements per row chunk of one solver step: the step's temporaries stay in cache


def _step(
    xg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None, qmin: int, qmax: int,
    optimize: str, beta: float, p: float, store_scale: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One half-quadratic step on rows ``xg``: (squared error of ``(s, z)`` per row, the updated
    parameter per row -- the new zero or the new scale)."""
    wq = _codes(xg, s, z, qmin, qmax)
    c = wq - z  # code offsets: W_r = s * c
    res = torch.mul(c, s).neg_().add_(xg)  # W - W_r
    if mask is not None:
        res.mul_(mask)  # padding contributes nothing to the error and the updates below
    err = res.square().sum(dim=1, keepdim=True)
    # shrink_lp(res) in place: sign(res) * relu(|res| - |res|^(p-1) / beta)
    sign = torch.sign(res)
    a = res.abs_()
    thr = a.pow(p - 1.0) if p != 1 else torch.ones_like(a)
    we = a.sub_(thr.div_(beta)).clamp_min_(0.0).mul_(sign)
    target = we.neg_().add_(xg)  # W - W_e
    if optimize == "zero":
        t = target.div_(s).neg_().add_(wq)  # W_q - (W - W_e) / s
        if mask is not None:
            t.mul_(mask)
        count = xg.shape[1] if mask is None else mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return err, _store_zero(t.sum(dim=1, keepdim=True) / count)
    if mask is not None:
        c.mul_(mask)
    num, den = target.mul_(c).sum(dim=1, keepdim=True), c.square_().sum(dim=1, keepdim=True)
    return err, torch.where(den > 0, store_scale(num / den.clamp_min(EPS)), s)


def hqq_rows(
    xg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    optimize: str = "zero",
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: bool = True,
    mask: torch.Tensor | None = None,
    store_scale: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
) -> HQQRows:
    """Half-quadratic optimisation of the zero (``optimize='zero'``) or the scale
    (``optimize='scale'``) of every row of ``xg`` ``(G, E)`` from ``scale`` / ``zero`` ``(G, 1)``.

    Each step re-codes the rows, shrinks the residual with :func:`shrink_lp` and updates the
    parameter in closed form; ``beta`` grows by ``kappa`` per step.  Rows keep their lowest
    squared-error parameters; with ``early_stop`` the loop ends once the total error of a step is
    not below the previous step's.  ``mask`` (0 on padding) weights every mean and error.
    """
    if optimize not in ("zero", "scale"):
        raise ValueError(f"optimize must be 'zero' or 'scale', got {optimize!r}")
    xg = xg.float()
    s, z = scale.float().reshape(-1, 1), zero.float().reshape(-1, 1)
    rows = xg.shape[0]
    step_rows = max(1, _CHUNK // max(1, xg.shape[1]))
    best_s, best_z = s, z
    best_err: torch.Tensor | None = None
    history: list[float] = []
    prev = math.inf
    for step in range(iters + 1):
        # one chunked pass: the error of (s, z) and the candidate update (unused if we stop here)
        errs, news = [], []
        for a in range(0, rows, step_rows):
            b = min(rows, a + step_rows)
            e, n = _step(xg[a:b], s[a:b], z[a:b], None if mask is None else mask[a:b], qmin, qmax, optimize,
                         beta, lp_norm, store_scale)
            errs.append(e)
            news.append(n)
        err = torch.cat(errs)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        total = float(err.sum())
        history.append(total)
        if step == iters or (early_stop and step > 0 and total >= prev):
            break
        prev = total
        if optimize == "zero":
            z = torch.cat(news)
        else:
            s = torch.cat(news)
        beta *= kappa
    assert best_err is not None
    return HQQRows(best_s, best_z, history, float(best_err.sum()))


# ---------------------------------------------------------------------------------- spec level
def _padding_mask(x: torch.Tensor, spec: QuantSpec, layout: GroupLayout) -> torch.Tensor | None:
    """1 for real elements, 0 for the fill that ``padding='pad'`` added; ``None`` if no fill."""
    return valid_mask(layout, x.device)


def _view(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, GroupLayout]:
    return group_view(x, spec.granularity, spec.group_size, spec.block, spec.padding)  # type: ignore[arg-type]


def check_options(lp_norm: float, beta: float, kappa: float, iters: int) -> None:
    """Raise a LowbitError for solver settings outside the bounds of :class:`HQQ`'s fields."""
    check_values(HQQ, {"lp_norm": lp_norm, "beta": beta, "kappa": kappa, "iters": iters}, OPTIONS_ERROR.format("hqq"))


def _check_spec(spec: QuantSpec) -> None:
    if spec.type != "int":
        raise LowbitError(
            f"HQQ optimises the zero point (or scale) of an int grid; got a {spec.type} spec "
            "(use type: int, e.g. bits 4, granularity group, group_size 64, symmetric: false)"
        )


def hqq_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: bool = True,
    round_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ-quantize ``weight`` with an int ``spec``: ``(Wdq, scale, zero)``.

    ``Wdq`` has the weight's shape and dtype; ``scale`` / ``zero`` (float32) have
    ``param_shape(layout)`` of the spec's grouping.  Asymmetric specs: min-max scale and an
    optimised fractional zero (fp16 values), started from the rounded zero with ``round_zero``.  Symmetric specs: the format's zero and an
    optimised scale.  Codes are ``hqq_codes(weight, spec, scale, zero)``.
    """
    _check_spec(spec)
    check_options(lp_norm, beta, kappa, iters)
    if weight.numel() == 0:
        raise LowbitError(f"cannot quantize an empty tensor of shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise LowbitError("HQQ needs a finite weight (it contains NaN or inf)")
    xg, layout = _view(w, spec)
    mask = _padding_mask(w, spec, layout)
    qmin, qmax = spec.qmin, spec.qmax
    lo, hi = xg.amin(dim=1), xg.amax(dim=1)  # fill repeats a real element: ranges are unchanged
    s, z_int = spec_qparams(lo, hi, spec)
    if spec.symmetric:
        res = hqq_rows(xg, s[:, None], z_int[:, None], qmin, qmax, optimize="scale", lp_norm=lp_norm, beta=beta,
                       kappa=kappa, iters=iters, early_stop=early_stop, mask=mask,
                       store_scale=lambda t: _store_scale(t, spec))
    else:
        z0 = qmin - lo.clamp(max=0.0) / s  # the range maps exactly onto [qmin, qmax]
        z0 = _store_zero(z0.round().clamp(qmin, qmax) if round_zero else z0)
        res = hqq_rows(xg, s[:, None], z0[:, None], qmin, qmax, optimize="zero", lp_norm=lp_norm, beta=beta,
                       kappa=kappa, iters=iters, early_stop=early_stop, mask=mask)
    q = _codes(xg, res.scale, res.zero, qmin, qmax)
    wdq = ungroup(dequantize_affine(q, res.scale, res.zero), layout).to(weight.dtype)
    shape = param_shape(layout)
    return wdq, res.scale.reshape(shape), res.zero.reshape(shape)


def hqq_codes(weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor) -> IntQuantized:
    """The integer form of an HQQ result: ``IntQuantized`` with codes ``clamp(round(W/s + z))``.

    Its ``zero`` holds HQQ's fractional (fp16-valued) zeros; :func:`lowbit.core.quant.dequantize`
    reconstructs exactly the HQQ weight from it.
    """
    xg, layout = _view(weight.detach().float(), spec)
    g = xg.shape[0]
    q = _codes(xg, scale.reshape(g, 1), zero.reshape(g, 1), spec.qmin, spec.qmax)
    return IntQuantized(ungroup(q, layout).to(code_dtype(spec.qmin, spec.qmax)), scale, zero, layout, spec.bits,
                        spec.signed, spec.symmetric, weight.dtype)


def hqq_bits_per_weight(spec: QuantSpec, numel: int, groups: int) -> float:
    """Stored bits per weight: codes, scales at ``scale_dtype`` width, fp16 zeros (asymmetric)."""
    bits = numel * spec.bits + groups * SCALE_BITS[spec.scale_dtype]
    if not spec.symmetric:
        bits += groups * ZERO_BITS
    return bits / numel


@register_method
@dataclass
class HQQ(WeightMethod):
    """Half-quadratic zero-point (asymmetric) or scale (symmetric) optimisation; data-free."""

    lp_norm: float = bounded(0.7, gt=0, le=1)
    beta: float = bounded(10.0, gt=0)
    kappa: float = bounded(1.01, ge=1)  # beta grows by kappa each step
    iters: int = bounded(20, ge=0)
    early_stop: bool = True
    round_zero: bool = True  # start from the integer zero (module docstring)

    name = "hqq"
    needs_hessian = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_spec(self.spec)

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = layer.weight.data
        wdq, scale, zero = hqq_quantize(w, self.spec, self.lp_norm, self.beta, self.kappa, self.iters,
                                        self.early_stop, self.round_zero)
        qt = hqq_codes(w, self.spec, scale, zero)
        return LayerResult(
            weight=wdq,
            bits_per_weight=hqq_bits_per_weight(self.spec, w.numel(), qt.layout.num_groups),
            form=qt,
            artifacts={"quantized": qt, "codes": qt.q, "scale": scale, "zero": zero,
                       "zero_dtype": "float16" if not self.spec.symmetric else "int"},
            int_refusal=None if self.spec.symmetric else
            "zero points are fractional (HQQ); integer formats need integer zero points",
        )
