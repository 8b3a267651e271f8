"""Importance scores for structured pruning: pure tensor math on accumulated activation statistics.

* channels (MLP intermediate, hidden size): the L2 norm of each channel's activation over the calibration
  tokens (Minitron's activation-based importance, aggregated with the L2 norm over tokens);
* query heads: the L2 norm of each head's slice of the attention output (the input of ``o_proj``), ranked
  within its key/value group so every group keeps the same number of heads (GQA stays uniform);
* layers: block influence ``1 - E[cos(x_in, x_out)]`` (ShortGPT): a block that barely turns its input
  hidden state matters least.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scores:
    """Higher is more important: per block an MLP-channel and a query-head score vector, one hidden-channel
    vector, one score per block; from activations (``from_activations``) or Taylor saliency (``taylor``)."""

    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    hidden: torch.Tensor | None
    layers: torch.Tensor
    tokens: int = 0


def channel_scores(sq_sum: torch.Tensor) -> torch.Tensor:
    """Per-channel L2 norm from the per-channel sum of squares."""
    return sq_sum.double().clamp_min(0).sqrt()


def head_scores(o_in_sq_sum: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head L2 norm from the per-channel sum of squares of the attention output (heads x head_dim)."""
    return o_in_sq_sum.double().reshape(n_heads, -1).sum(1).sqrt()


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order (ties by position)."""
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return order.sort().values


def heads_to_keep(scores: torch.Tensor, n_kv: int, keep_per_group: int) -> torch.Tensor:
    """Query heads kept: the ``keep_per_group`` best of each key/value group (heads of group ``g`` are the
    consecutive ``g * group .. (g + 1) * group - 1``), ascending."""
    group = scores.numel() // n_kv
    kept = [g * group + top_channels(scores[g * group : (g + 1) * group], keep_per_group) for g in range(n_kv)]
    return torch.cat(kept)


def block_influence(cos_sum: torch.Tensor, count: int) -> torch.Tensor:
    """ShortGPT's block influence per layer from the summed cosine of each token's input and output state."""
    return 1 - cos_sum.double() / max(count, 1)


def layers_to_drop(influence: torch.Tensor, n_drop: int) -> list[int]:
    """The ``n_drop`` layers of lowest score (block influence, Taylor saliency), ascending."""
    return sorted(torch.argsort(influence, stable=True)[:n_drop].tolist())
