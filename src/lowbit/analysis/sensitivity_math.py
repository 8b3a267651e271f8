"""Pure math of per-layer sensitivity: the Hessian-diagonal proxy, KL against stored reference
probabilities, rank statistics (average ranks, Spearman's rho) and per-type aggregates."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def diag_hessian_error(dw: torch.Tensor, sq_mean: torch.Tensor) -> float:
    """``sum_j E[x_j^2] * ||dW[:, j]||^2`` for a weight change ``dW`` (out x in) and the mean squared
    input per input channel ``E[x_j^2]`` (in,).

    It is the layer's expected squared output error ``E||dW x||^2`` with the off-diagonal terms of
    ``E[x x^T]`` dropped: the diagonal of GPTQ's / OBQ's layer-wise reconstruction Hessian
    ``H = 2 E[x x^T]`` (halved), not HAWQ's Hessian of the model loss.
    """
    if dw.dim() != 2 or sq_mean.shape != (dw.shape[1],):
        raise ValueError(f"dW must be (out, in) and E[x^2] (in,), got {tuple(dw.shape)} and {tuple(sq_mean.shape)}")
    return float((dw.double().pow(2).sum(0) * sq_mean.double()).sum())


def kl_sum(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """``sum over positions of KL(p_ref || softmax(logits))`` from stored reference log-probabilities
    (..., V); summed in the ``p (log p - log q)`` form, which has no cancellation for small KL."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(-1).double().sum())


def nll_sum_shifted(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of ``-log q(ids[t+1])`` over positions ``t`` (logits (B, L, V), ids (B, L))."""
    pred = logits[:, :-1].float()
    return float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span (``[3, 1, 3] -> [2.5, 1, 2.5]``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant (undefined)."""
    if len(a) != len(b):
        raise ValueError(f"pearson needs equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        return None
    ma, mb = math.fsum(a) / n, math.fsum(b) / n
    sab = math.fsum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = math.fsum((x - ma) ** 2 for x in a)
    sbb = math.fsum((y - mb) ** 2 for y in b)
    if saa == 0 or sbb == 0:
        return None
    return max(-1.0, min(1.0, sab / math.sqrt(saa * sbb)))


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho: the Pearson correlation of average ranks (ties handled); None when undefined."""
    return pearson(average_ranks(a), average_ranks(b))


def group_aggregates(layers: Sequence[Mapping[str, Any]], key: str, metrics: Sequence[str] = ("kl", "proxy")
                     ) -> dict[str, dict[str, float]]:
    """Per value of ``key`` (e.g. ``type``): layer count, mean / median / max of each metric, and the
    group's share of the metric's total over all layers."""
    totals = {m: math.fsum(float(l[m]) for l in layers) for m in metrics}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for l in layers:
        groups.setdefault(str(l[key]), []).append(l)
    out: dict[str, dict[str, float]] = {}
    for g, ls in groups.items():
        row: dict[str, float] = {"count": len(ls)}
        for m in metrics:
            vals = [float(l[m]) for l in ls]
            row[f"mean_{m}"] = math.fsum(vals) / len(vals)
            row[f"median_{m}"] = statistics.median(vals)
            row[f"max_{m}"] = max(vals)
            row[f"share_{m}"] = math.fsum(vals) / totals[m] if totals[m] else 0.0
        out[g] = row
    return out
