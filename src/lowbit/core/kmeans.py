"""K-means (Lloyd's algorithm with k-means++ seeding), deterministic for a seed.

Used by RPTQ to cluster activation channels by their calibration ranges ``(min, max)``.
"""

from __future__ import annotations

import torch


def _plus_plus(points: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to its squared distance."""
    n = points.shape[0]
    centers = [points[int(torch.randint(n, (1,), generator=gen))]]
    d2 = (points - centers[0]).pow(2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: repeat one
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=gen))
        centers.append(points[idx])
        d2 = torch.minimum(d2, (points - points[idx]).pow(2).sum(1))
    return torch.stack(centers)


def kmeans(points: torch.Tensor, k: int, iters: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``points`` (n, d) into ``min(k, n)`` clusters; returns ``(labels (n,), centers (k, d))``.

    Labels are numbered by ascending centre (first coordinate, then the next), so equal inputs give
    equal outputs and the numbering is meaningful (RPTQ: cluster 0 holds the narrowest channels).
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (n, d) tensor, got shape {tuple(points.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    x = points.double()
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    centers = _plus_plus(x, k, gen)
    labels = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if members.shape[0]:
                centers[c] = members.mean(0)
            else:  # an emptied cluster takes the point farthest from its centre
                far = (x - centers[labels]).pow(2).sum(1).argmax()
                centers[c] = x[far]
                labels[far] = c
    order = sorted(range(k), key=lambda c: tuple(centers[c].tolist()))
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(k)
    return rank[labels], centers[torch.tensor(order)].to(points.dtype)
