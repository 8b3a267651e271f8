"""Pure math on logits: negative log-likelihood, KL divergence, top-1 agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over positions of ``-log softmax(logits[b, t])[targets[b, t]]``; ``(B, T, V)`` and ``(B, T)``."""
    if targets.shape[1] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    pred = logits.float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.to(pred.device).reshape(-1), reduction="sum")


def shifted_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of ``-log p(ids[t+1] | ids[:t+1])`` for ``logits (B, L, V)`` and ``ids (B, L)``."""
    return nll_sum(logits[:, :-1, :], ids[:, 1:])


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``KL(p_ref || p)`` summed over positions, and the count of equal argmax tokens.

    Both inputs are ``(B, L, V)``; every position counts (the model's next-token distribution).
    """
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    agree = ref_lp.argmax(-1) == lp.argmax(-1)
    return kl.sum(), agree.sum()
