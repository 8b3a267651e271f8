"""OliVe's outlier-victim pair (OVP) encoding (Guo et al., ISCA 2023), as fake-quant math.

Values are taken in adjacent pairs along the last dimension.  A value whose magnitude (in units of
the scale) would clip on the normal signed grid ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` is an outlier: it
is stored in *abfloat*, a float code whose exponent bias starts its range just above the normal
grid, and its pair partner (the *victim*) is pruned to zero, its slot holding the identifier code
``-2^(b-1)`` that the normal grid leaves unused.  When both values of a pair are outliers the larger
survives.  Every value keeps exactly ``b`` bits, so the layout stays aligned (the paper's point).

abfloat with ``m`` mantissa and ``e`` exponent bits (``1 + e + m = b``; E2M1 at 4 bits, E4M3 at 8)
has magnitudes ``(2^m + mantissa) * 2^(exponent + bias)``, ``bias`` the smallest with
``2^m * 2^bias > 2^(b-1) - 1``: at 4 bits {8, 12, 16, 24, 32, 48, 64, 96}.
"""

from __future__ import annotations

from functools import lru_cache

import torch

ABFLOAT_BITS = {4: (2, 1), 8: (4, 3)}  # bits -> (exponent bits, mantissa bits)
SCALE_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(18))  # scale = ratio * absmax / normal max


def normal_max(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _check_bits(bits: int) -> None:
    if bits not in ABFLOAT_BITS:
        raise ValueError(f"OliVe's outlier-victim pairs are defined for 4 and 8 bits, got {bits}")


@lru_cache(maxsize=None)
def abfloat_magnitudes(bits: int) -> torch.Tensor:
    """The positive abfloat values (in units of the scale), ascending."""
    _check_bits(bits)
    e_bits, m_bits = ABFLOAT_BITS[bits]
    bias = 0
    while (1 << m_bits) << bias <= normal_max(bits):
        bias += 1
    vals = [((1 << m_bits) + m) * 2.0 ** (e + bias) for e in range(1 << e_bits) for m in range(1 << m_bits)]
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _round_to(mags: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest grid value for each (non-negative) magnitude; beyond the grid saturates."""
    mid = (grid[1:] + grid[:-1]) / 2
    return grid[torch.bucketize(mags, mid)]


def ovp_fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` with outlier-victim pairs along its last dimension.

    ``scale`` broadcasts against ``x`` (one per tensor, or one per row as ``(rows, 1)``).
    """
    _check_bits(bits)
    n = x.shape[-1]
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    y = x.float() / s
    if n % 2:
        y = torch.nn.functional.pad(y, (0, 1))
    pairs = y.reshape(*y.shape[:-1], -1, 2)
    mag = pairs.abs()
    top = normal_max(bits)
    outlier = mag > top + 0.5  # would clip on the normal grid
    pair_has = outlier.any(-1, keepdim=True)
    keep_first = mag[..., :1] >= mag[..., 1:]
    survivor = torch.cat([keep_first, ~keep_first], -1)
    normal = pairs.round().clamp(-top, top)
    grid = abfloat_magnitudes(bits).to(device=x.device, dtype=torch.float32)
    big = torch.sign(pairs) * _round_to(mag, grid)
    q = torch.where(pair_has, torch.where(survivor, big, torch.zeros_like(big)), normal)
    q = q.reshape(*y.shape)[..., :n]
    return (q * s).to(x.dtype)


def ovp_error(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error of ``ovp_fake_quant`` summed over the last dimension."""
    return (ovp_fake_quant(x, scale, bits) - x.float()).pow(2).sum(-1)


def search_ovp_scale(x: torch.Tensor, bits: int, per_row: bool) -> torch.Tensor:
    """The scale (one per row of ``x`` with ``per_row``, else one) minimising the OVP squared error,
    over ``ratio * absmax / normal_max`` for the ratios in ``SCALE_RATIOS``."""
    _check_bits(bits)
    x = x.float()
    absmax = x.abs().amax(-1, keepdim=True) if per_row else x.abs().max().reshape(1, 1)
    absmax = absmax.clamp(min=1e-8)
    best_err = best = None
    for r in SCALE_RATIOS:
        s = absmax * r / normal_max(bits)
        err = ovp_error(x, s, bits) if per_row else ovp_error(x, s, bits).sum().reshape(1)
        if best is None:
            best, best_err = s.clone(), err
        else:
            better = err < best_err
            best = torch.where(better.reshape(best.shape), s, best)
            best_err = torch.minimum(err, best_err)
    return best if per_row else best.reshape(())
