"""Logit distillation for quantization-aware training (LLM-QAT's loss).

``kl_to_teacher`` is the math: the mean over tokens of ``KL(p_teacher || p_student)`` at a temperature,
which has the gradient of LLM-QAT's cross entropy against the teacher's soft targets and is 0 when the
student matches.  ``LogitDistillation`` is the training loss ``train_next_token`` takes: the
full-precision teacher runs without gradients on the same batch; the student runs with a
fake-quantized KV cache when one is set (activations are fake-quantized by the student's own input
quantizers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.kvcache.config import KVCacheConfig


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 1024) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(t / T) || softmax(s / T)) * T^2``, ``chunk`` tokens at a time
    (the vocabulary-wide softmaxes of a whole batch would not fit beside the model)."""
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    total = s.new_zeros((), dtype=torch.float32)
    for a in range(0, s.shape[0], chunk):
        ls = F.log_softmax(s[a:a + chunk].float() / temperature, dim=-1)
        lt = F.log_softmax(t[a:a + chunk].float() / temperature, dim=-1)
        total = total + F.kl_div(ls, lt, log_target=True, reduction="sum")
    return total * temperature ** 2 / s.shape[0]


class LogitDistillation:
    """``loss(model, batch)``: the student's KL to ``teacher`` on the batch, with a fake-quantized KV cache."""

    def __init__(self, teacher: torch.nn.Module, kv_cache: KVCacheConfig | None = None,
                 temperature: float = 1.0) -> None:
        self.teacher = teacher.eval()
        self.kv_cache = kv_cache
        self.temperature = temperature

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch).logits
        kw: dict[str, Any] = {}
        if self.kv_cache is not None:
            from lowbit.kvcache.fake import FakeQuantKVCache

            kw = {"past_key_values": FakeQuantKVCache(model, self.kv_cache), "use_cache": True}
        return kl_to_teacher(model(input_ids=batch, **kw).logits, teacher_logits, self.temperature)
