"""Pure math on logits: negative log-likelihood, KL divergence, top-1 agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of ``-log p(ids[t+1] | ids[:t+1])`` for ``logits (B, L, V)`` and ``ids (B, L)``."""
    pred = logits[:, :-1, :].float()
    target = ids[:, 1:].to(pred.device)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``KL(p_ref || p)`` summed over positions, and the count of equal argmax tokens.

    Both inputs are ``(B, L, V)``; every position counts (the model's next-token distribution).
    """
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    agree = ref_lp.argmax(-1) == lp.argmax(-1)
    return kl.sum(), agree.sum()
