"""Distillation losses, pure tensor math.

* logits: ``kl_to_teacher`` (``lowbit.qat.distill``), KL(teacher || student) at a temperature, times T^2;
* hidden states: mean squared error between the student's state, projected to the teacher's width when the
  widths differ (a learned linear map, as in TinyBERT / Minitron), and the teacher's state at the mapped layer,
  relative to the teacher state's mean square;
* attention maps: KL between the teacher's and the student's attention distributions of each query, averaged
  over heads first when the head counts differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.qat.distill import kl_to_teacher


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer imitates: spread evenly, the last onto the last."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, proj: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean squared error of ``proj(student)`` (or ``student``) against ``teacher``, both (..., width), relative to
    the teacher's mean square: LLM hidden states carry a few huge channels, so the raw MSE would be in the
    thousands and drown the logit term; relative, 1 means "no better than zeros"."""
    s = proj(student) if proj is not None else student
    t = teacher.float()
    return F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-12)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over queries of ``KL(teacher row || student row)`` of attention maps (batch, heads, q, k); maps with
    other head counts are averaged over heads first."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    t = teacher.float().clamp_min(eps)
    s = student.float().clamp_min(eps)
    return (t * (t.log() - s.log())).sum(-1).mean()


__all__ = ["kl_to_teacher", "layer_map", "feature_loss", "attention_loss"]
