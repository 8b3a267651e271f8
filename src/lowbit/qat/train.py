"""A small seeded training loop for causal LMs: next-token loss on token windows, AdamW, cosine decay.

Used by PEQA (scales only) and end-to-end QAT: whatever parameters of the model require gradients train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step
    tokens: int = 0
    trained_params: int = 0


def train_next_token(model: torch.nn.Module, windows: torch.Tensor, steps: int, lr: float = 1e-4,
                     batch_size: int = 4, seed: int = 0) -> TrainResult:
    """Train the parameters of ``model`` that require gradients on ``windows`` (n, seqlen) token ids:
    ``steps`` AdamW steps of ``batch_size`` windows each, drawn without replacement per pass (seeded)."""
    if steps < 1:
        raise LowbitError(f"steps must be at least 1, got {steps}")
    if windows.dim() != 2 or windows.shape[0] < batch_size:
        raise LowbitError(f"training needs at least one batch of {batch_size} windows, got {tuple(windows.shape)}; "
                          "use more data or a smaller batch size")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LowbitError("no parameter of this model requires gradients: nothing to train")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(trained_params=sum(p.numel() for p in params))
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():  # callers may run under no_grad (the sequential pipeline does)
            _steps(model, windows, steps, batch_size, gen, opt, sched, result)
    finally:
        model.train(was_training)
    return result


def _steps(model: torch.nn.Module, windows: torch.Tensor, steps: int, batch_size: int, gen: torch.Generator,
           opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, result: TrainResult) -> None:
    """The optimizer steps: batches drawn without replacement per pass over the windows."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(windows.shape[0], generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = windows[idx].to(next(model.parameters()).device)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        result.tokens += batch.numel()
