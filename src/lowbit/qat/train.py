"""A small seeded training loop for causal LMs: next-token loss on token windows, AdamW, cosine decay.

Used by PEQA (scales only), LoRA / QLoRA, end-to-end QAT and LLM-QAT: whatever parameters of the model
require gradients train.  The loss is next-token cross entropy unless ``loss_fn(model, batch)`` says
otherwise (LLM-QAT's distillation); the optimizer is AdamW with fp32, 8-bit or 4-bit states
(``lowbit.qat.optim``).
With a checkpoint path, the whole state (trained parameters, optimizer, schedule, batch order, losses) is
written atomically every ``every`` steps; ``resume`` continues from it and ends bit-identical to a run
that was never interrupted.  A checkpoint records what run it belongs to (the trained tensors' names and
shapes, the data, the settings) and is refused for any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step
    tokens: int = 0
    trained_params: int = 0
    resumed_at: int = 0  # the step a resumed run started from (0: from the start)

    def mean_loss(self, first: int = 0, last: int = 0) -> float:
        """Mean loss of the first ``first`` (or the last ``last``) steps."""
        part = self.losses[:first] if first else self.losses[-last:]
        return sum(part) / len(part)


@contextlib.contextmanager
def grad_flags_restored(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` as it was on entry, whatever a training step froze or swapped."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, g in flags.items():
            p.requires_grad_(g)


@dataclass
class _State:
    step: int = 0
    order: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0


LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, float, int, float], None]  # (step, steps, loss, tokens so far, seconds so far)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of each next token (the model's own ``labels`` loss)."""
    return model(input_ids=batch, labels=batch).loss


def _run_id(model: torch.nn.Module, windows: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
            optimizer: str) -> str:
    """What a checkpoint must match: the trained tensors, the data and the settings."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"{n}:{tuple(p.shape)};".encode())
    h.update(windows.contiguous().cpu().numpy().tobytes())
    h.update(f"{steps},{lr!r},{batch_size},{seed},{optimizer}".encode())
    return h.hexdigest()


def train_next_token(model: torch.nn.Module, windows: torch.Tensor, steps: int, lr: float = 1e-4,
                     batch_size: int = 4, seed: int = 0, checkpoint: str | Path | None = None, every: int = 0,
                     resume: bool = False, optimizer: str = "adamw", loss_fn: LossFn | None = None,
                     progress: Progress | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require gradients on ``windows`` (n, seqlen) token ids:
    ``steps`` optimizer steps of ``batch_size`` windows each, drawn without replacement per pass (seeded);
    ``optimizer`` is one of ``lowbit.qat.optim.OPTIMIZERS``."""
    from lowbit.qat.optim import make_optimizer

    if steps < 1:
        raise LowbitError(f"steps must be at least 1, got {steps}")
    if windows.dim() != 2 or windows.shape[0] < batch_size:
        raise LowbitError(f"training needs at least one batch of {batch_size} windows, got {tuple(windows.shape)}; "
                          "use more data or a smaller batch size")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LowbitError("no parameter of this model requires gradients: nothing to train")
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    gen = torch.Generator().manual_seed(seed)
    state = _State()
    run_id = _run_id(model, windows, steps, lr, batch_size, seed, optimizer) if checkpoint is not None else ""
    if resume:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise LowbitError(f"nothing to resume: no checkpoint at {checkpoint}")
        _load(Path(checkpoint), run_id, model, names, opt, sched, gen, state)
    result = TrainResult(trained_params=sum(p.numel() for p in params), resumed_at=state.step)
    was_training = model.training
    model.train()
    t0, first_tokens = time.perf_counter(), state.tokens
    try:
        with torch.enable_grad():  # callers may run under no_grad (the sequential pipeline does)
            while state.step < steps:
                _step(model, windows, batch_size, gen, opt, sched, state, loss_fn or next_token_loss)
                if progress is not None:
                    progress(state.step, steps, state.losses[-1], state.tokens - first_tokens,
                             time.perf_counter() - t0)
                if checkpoint is not None and every and (state.step % every == 0 or state.step == steps):
                    _save(Path(checkpoint), run_id, model, names, opt, sched, gen, state)
    finally:
        model.train(was_training)
    result.losses, result.tokens = state.losses, state.tokens
    return result


def _step(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, gen: torch.Generator,
          opt: torch.optim.Optimizer, sched: Any, state: _State, loss_fn: LossFn) -> None:
    """One optimizer step on the next ``batch_size`` windows of the shuffled order."""
    if len(state.order) < batch_size:
        state.order = torch.randperm(windows.shape[0], generator=gen).tolist()
    idx, state.order = state.order[:batch_size], state.order[batch_size:]
    batch = windows[idx].to(next(model.parameters()).device)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    sched.step()
    state.step += 1
    state.losses.append(loss.item())
    state.tokens += batch.numel()


def _save(path: Path, run_id: str, model: torch.nn.Module, names: list[str], opt: torch.optim.Optimizer,
          sched: Any, gen: torch.Generator, state: _State) -> None:
    params = dict(model.named_parameters())
    blob = {"run_id": run_id, "params": {n: params[n].detach().cpu().clone() for n in names},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
            "step": state.step, "order": state.order, "losses": state.losses, "tokens": state.tokens}
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)


@torch.no_grad()
def _load(path: Path, run_id: str, model: torch.nn.Module, names: list[str], opt: torch.optim.Optimizer,
          sched: Any, gen: torch.Generator, state: _State) -> None:
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise LowbitError(f"{path} is not a lowbit training checkpoint ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("run_id") != run_id:
        raise LowbitError(f"{path} belongs to another run (other model, data or settings); resume with the same "
                          "arguments, or start over without --resume")
    params = dict(model.named_parameters())
    for n in names:
        params[n].copy_(blob["params"][n])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    gen.set_state(blob["generator"])
    state.step, state.order, state.losses, state.tokens = blob["step"], blob["order"], blob["losses"], blob["tokens"]
