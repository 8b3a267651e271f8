"""Pure mask math for pruning: which entries of a score matrix to zero (True = pruned)."""

from __future__ import annotations

import torch


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the ``round(sparsity * cols)`` lowest scores of each row (ties by position)."""
    k = int(round(sparsity * score.shape[1]))
    idx = score.argsort(dim=1, stable=True)[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the ``round(sparsity * numel)`` lowest scores of the whole matrix (ties by position)."""
    k = int(round(sparsity * score.numel()))
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    flat[score.reshape(-1).argsort(stable=True)[:k]] = True
    return flat.reshape(score.shape)


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the ``n`` lowest scores of every ``m`` consecutive columns of each row (cols % m == 0)."""
    rows, cols = score.shape
    blocks = score.reshape(rows, cols // m, m)
    idx = blocks.argsort(dim=2, stable=True)[..., :n]
    return torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)`` with ``0 < N < M <= 64``; ValueError otherwise."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must look like '2:4' (N of every M weights pruned), got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m <= 64:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M <= 64")
    return n, m


def owl_sparsities(outlier_ratios: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    """OWL's per-layer sparsities: outlier ratios rescaled to ``[0, 2 lam]``, centred so the densities average
    ``1 - target``; more outliers, more density.  Equal ratios (or one layer): ``target`` everywhere."""
    r = outlier_ratios.double()
    spread = r.max() - r.min() if r.numel() else r.new_zeros(())
    if r.numel() < 2 or spread == 0:
        return torch.full_like(r, target)
    scaled = (r - r.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1 - target)
    return 1 - density
