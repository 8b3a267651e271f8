"""llama.cpp's IQ4_NL: blocks of 32 weights, one fp16 scale, 4-bit indices into a fixed non-uniform grid.

``w = d * KVALUES[q]``: 4.5 bits per weight like Q4_0, on a grid denser near zero.  The rounding follows
``quantize_row_iq4_nl_impl``: the scale is the least-squares one of the best of 15 grids ``(s - 127) / max`` (s = -7..7, plus the first ``max / 127`` one), weights ``x^2`` (or
``imatrix * sqrt(sigma2 + x^2)``), then every weight is re-rounded to its nearest grid value at that scale.
"""

from __future__ import annotations

import torch

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
BLOCK = 32
BYTES = 18
_CHUNK = 1 << 16  # blocks per pass (bounds the (blocks, 32, 16) distance tensor)


def nearest_index(v: torch.Tensor) -> torch.Tensor:
    """Index of the grid value nearest each of ``v`` (``best_index_int8``: ties go to the larger value)."""
    grid = torch.tensor(KVALUES, dtype=torch.float32)
    dist = (v.unsqueeze(-1) - grid).abs()
    return 15 - dist.flip(-1).argmin(-1)  # last minimum: the larger value on a tie


def _fit(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale of each block of ``x`` (n, 32) with fit weights ``w``."""
    grid = torch.tensor(KVALUES, dtype=torch.float32)
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    live = peak.abs() >= 1e-15  # GROUP_MAX_EPS
    safe = peak.where(live, torch.ones_like(peak))

    def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = grid[nearest_index(inv * x)]
        return (w * q * x).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True)

    sqx, sq2 = sums(1 / (-safe / KVALUES[0]))
    d = sqx / sq2.where(sq2 > 0, torch.ones_like(sq2))
    best = d * sqx
    for step in range(-7, 8):
        sqx, sq2 = sums((step + KVALUES[0]) / safe)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        cand = sqx / sq2.where(sq2 > 0, torch.ones_like(sq2))
        d = torch.where(better, cand, d)
        best = torch.where(better, cand * sqx, best)
    return d.where(live, torch.zeros_like(d)).squeeze(1)


def encode_iq4_nl(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """IQ4_NL bytes of ``weight`` (rows, cols), ``cols`` a multiple of 32: (rows * cols / 32, 18)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"IQ4_NL needs rows of a multiple of {BLOCK} weights, got {cols}")
    x_all = weight.detach().float().reshape(-1, BLOCK)
    imp = None if imatrix is None else imatrix.float().reshape(1, -1).expand(rows, -1).reshape(-1, BLOCK)
    out = []
    for a in range(0, x_all.shape[0], _CHUNK):
        x = x_all[a:a + _CHUNK]
        if imp is None:
            w = x * x
        else:
            sigma2 = 2 * x.square().mean(dim=1, keepdim=True)
            w = imp[a:a + _CHUNK] * (sigma2 + x * x).sqrt()
        d = _fit(x, w)
        inv = (1 / d.where(d != 0, torch.ones_like(d))).where(d != 0, torch.zeros_like(d))
        q = nearest_index(inv.unsqueeze(1) * x).to(torch.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)
        head = d.to(torch.float16).reshape(-1, 1).view(torch.uint8)
        out.append(torch.cat([head, packed], dim=1))
    return torch.cat(out)
