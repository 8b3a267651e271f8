"""KVQuant's non-uniform datatype: a level table fitted by sensitivity-weighted 1-D k-means.

Values are first mapped to code units of their own group (``lowbit.kvcache.quant.code_units``:
0 at the group's minimum, ``2^bits - 1`` at its maximum).  The ``2^bits`` levels then minimise
``sum_i w_i (u_i - level(u_i))^2``, where ``w_i`` is the value's sensitivity (the Fisher
information, the squared gradient of the loss; 1 for a plain MSE fit).  Lloyd's algorithm in one
dimension from two starts (the uniform table and the weighted quantiles), the better one kept,
so the fit never ends worse than uniform codes.
"""

from __future__ import annotations

import torch

from lowbit.kvcache.quant import nearest_level


def uniform_levels(bits: int) -> torch.Tensor:
    """The table of plain integer codes ``0, 1, ..., 2^bits - 1``."""
    return torch.arange(1 << bits, dtype=torch.float32)


def weighted_error(u: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> float:
    """``sum w (u - nearest level)^2 / sum w``."""
    q = levels[nearest_level(u, levels)]
    return float((w * (u - q).pow(2)).sum() / w.sum().clamp_min(1e-30))


def _weighted_quantiles(u: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` points splitting the ``w``-weighted distribution of ``u`` into equal masses (cell centres)."""
    order = u.argsort()
    cum = w[order].cumsum(0)
    targets = (torch.arange(k, dtype=cum.dtype) + 0.5) / k * cum[-1]
    return u[order][torch.searchsorted(cum, targets).clamp(max=u.numel() - 1)]


def _lloyd(u: torch.Tensor, w: torch.Tensor, levels: torch.Tensor, iters: int) -> torch.Tensor:
    """Weighted Lloyd iterations from ``levels``.  A level left with no values is re-seated on one of
    the values with the largest weighted error (which only lowers the error), as k-means does."""
    k = levels.numel()
    for _ in range(iters):
        cell = nearest_level(u, levels)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, cell, w)
        moment = torch.zeros(k, dtype=torch.float64).index_add_(0, cell, w * u)
        centres = torch.where(mass > 0, moment / mass.clamp_min(1e-300), levels).clamp(0, k - 1)
        occupied = centres[mass > 0].sort().values
        empty = k - occupied.numel()
        if empty:
            err = w * (u - occupied[nearest_level(u, occupied)]).pow(2)
            centres = torch.cat([occupied, u[err.topk(min(empty, u.numel())).indices]])
            if centres.numel() < k:  # fewer values than levels: keep the old places for the rest
                centres = torch.cat([centres, levels[: k - centres.numel()]])
        new = centres.sort().values
        if torch.equal(new, levels):
            break
        levels = new
    return levels


def fit_levels(u: torch.Tensor, w: torch.Tensor | None, bits: int, iters: int = 100) -> torch.Tensor:
    """Sorted ``2^bits`` levels in ``[0, 2^bits - 1]`` minimising the ``w``-weighted squared error of
    the code-unit values ``u``: weighted Lloyd from two starts, the uniform table and the weighted
    quantiles of ``u``, keeping the better (so never worse than uniform codes)."""
    u = u.reshape(-1).double()
    w = torch.ones_like(u) if w is None else w.reshape(-1).double()
    if u.shape != w.shape:
        raise ValueError(f"values and weights differ in size: {u.numel()} vs {w.numel()}")
    if not u.numel():
        raise ValueError("no values to fit levels to")
    k = 1 << bits
    starts = [uniform_levels(bits).double(), _weighted_quantiles(u, w, k).clamp(0, k - 1).sort().values]
    fits = [_lloyd(u, w, s, iters) for s in starts]
    return min(fits, key=lambda lv: weighted_error(u, w, lv)).float()
