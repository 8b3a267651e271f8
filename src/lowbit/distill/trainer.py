"""The distillation loss ``train_next_token`` takes, and ``distill``: train every student parameter to imitate a
frozen teacher on token windows.

The loss is a weighted sum of the logit KL (temperature ``T``), the hidden-state MSE at evenly mapped layers
(through learned projections when the widths differ; they train with the student and are dropped after),
the attention-map KL (both models switched to eager attention, which returns the maps) and, optionally, the
plain next-token loss.  Teacher and student must share the vocabulary: checked before any work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.distill.losses import attention_loss, feature_loss, kl_to_teacher, layer_map
from lowbit.errors import LowbitError
from lowbit.fields import bounded, check_fields
from lowbit.qat.train import Progress, TrainResult, grad_flags_restored, train_next_token

PROJECTIONS = "lowbit_kd_projections"  # where the projections sit on the student while it trains


@dataclass
class DistillConfig:
    """The weights of the loss terms and the training settings."""

    steps: int = bounded(100, ge=1)
    lr: float = bounded(1e-4, gt=0)
    batch_size: int = bounded(4, ge=1)
    seed: int = 0
    temperature: float = bounded(1.0, gt=0)
    logit_weight: float = bounded(1.0, ge=0)
    feature_weight: float = bounded(0.0, ge=0)
    attention_weight: float = bounded(0.0, ge=0)
    next_token_weight: float = bounded(0.0, ge=0)
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        from lowbit.qat.optim import check_optimizer

        check_fields(self, "invalid distillation settings: ")
        check_optimizer(self.optimizer)
        if not (self.logit_weight or self.feature_weight or self.attention_weight or self.next_token_weight):
            raise LowbitError("every distillation loss weight is 0: nothing to train on; set logit_weight > 0")


def _layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def check_pair(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """LowbitError unless the student can learn from the teacher's outputs (the same vocabulary)."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise LowbitError(f"the student's vocabulary ({vs} tokens) is not the teacher's ({vt}); distillation compares "
                          "next-token distributions, so both need the same tokenizer")


class Distillation:
    """``loss(student, batch)`` against ``teacher`` (module docstring); ``projections`` map student widths to
    the teacher's (None when they match or features are not distilled)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, cfg: DistillConfig) -> None:
        check_pair(student, teacher)
        self.teacher, self.cfg = teacher.eval(), cfg
        self.map = layer_map(_layers(student), _layers(teacher))
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        self.projections: torch.nn.ModuleList | None = None
        if cfg.feature_weight and ds != dt:
            p = next(student.parameters())
            self.projections = torch.nn.ModuleList(
                torch.nn.Linear(ds, dt, bias=False, device=p.device, dtype=p.dtype) for _ in self.map)

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        kw = {"output_hidden_states": bool(cfg.feature_weight), "output_attentions": bool(cfg.attention_weight)}
        with torch.no_grad():
            t = self.teacher(input_ids=batch, **kw)
        s = model(input_ids=batch, labels=batch if cfg.next_token_weight else None, **kw)
        loss = s.logits.new_zeros((), dtype=torch.float32)
        if cfg.logit_weight:
            loss = loss + cfg.logit_weight * kl_to_teacher(s.logits, t.logits, cfg.temperature)
        if cfg.feature_weight:
            terms = [feature_loss(s.hidden_states[i + 1], t.hidden_states[j + 1],
                                  None if self.projections is None else self.projections[i])
                     for i, j in enumerate(self.map)]
            loss = loss + cfg.feature_weight * torch.stack(terms).mean()
        if cfg.attention_weight:
            terms = [attention_loss(s.attentions[i], t.attentions[j]) for i, j in enumerate(self.map)]
            loss = loss + cfg.attention_weight * torch.stack(terms).mean()
        if cfg.next_token_weight:
            loss = loss + cfg.next_token_weight * s.loss
        return loss


@contextlib.contextmanager
def _eager_attention(*models: torch.nn.Module) -> Iterator[None]:
    """Eager attention (which returns the maps) on ``models`` for the block, then what each had."""
    before = [m.config._attn_implementation for m in models]
    try:
        for m in models:
            m.set_attn_implementation("eager")
        yield
    finally:
        for m, impl in zip(models, before):
            m.set_attn_implementation(impl)


@contextlib.contextmanager
def _projections_on(student: torch.nn.Module, projections: torch.nn.ModuleList | None) -> Iterator[None]:
    """The projections as a submodule of the student while it trains (so the optimizer sees them), then gone."""
    if projections is None:
        yield
        return
    student.add_module(PROJECTIONS, projections)
    try:
        yield
    finally:
        delattr(student, PROJECTIONS)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor, cfg: DistillConfig,
            progress: Progress | None = None) -> TrainResult:
    """Train every parameter of ``student`` against the frozen ``teacher`` on ``windows`` (n, seqlen)."""
    loss = Distillation(teacher, student, cfg)
    for p in teacher.parameters():
        p.requires_grad_(False)
    eager: Any = _eager_attention(student, teacher) if cfg.attention_weight else contextlib.nullcontext()
    with grad_flags_restored(student), grad_flags_restored(teacher), eager, _projections_on(student, loss.projections):
        for p in student.parameters():
            p.requires_grad_(True)
        return train_next_token(student, windows, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed,
                                optimizer=cfg.optimizer, loss_fn=loss, progress=progress)
