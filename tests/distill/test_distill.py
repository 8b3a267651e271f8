"""Distillation: the losses against naive references, a student of another depth and width learning from its
teacher (every loss term falls), projections gone afterwards, and clear errors before work."""

from __future__ import annotations

import pytest
import torch

from lowbit.distill import DistillConfig, Distillation, distill
from lowbit.distill.losses import attention_loss, feature_loss, layer_map
from lowbit.distill.trainer import PROJECTIONS
from lowbit.errors import LowbitError


def _llama(hidden: int, layers: int, vocab: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_layer_map_spreads_evenly():
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(3, 30) == [9, 19, 29]
    assert layer_map(4, 4) == [0, 1, 2, 3]


def test_losses_against_naive_references():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ms = (t ** 2).mean().item()
    assert feature_loss(s, t).item() == pytest.approx(((s - t) ** 2).mean().item() / ms, rel=1e-6)
    proj = torch.nn.Linear(8, 8, bias=False)
    assert feature_loss(s, t, proj).item() == pytest.approx(((proj(s) - t) ** 2).mean().item() / ms, rel=1e-6)
    assert feature_loss(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    a = torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1)
    b = torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1)
    naive = sum((b[0, h, q] * (b[0, h, q].log() - a[0, h, q].log())).sum() for h in range(2) for q in range(3)) / 6
    assert attention_loss(a, b).item() == pytest.approx(naive.item(), rel=1e-5)  # student a, teacher b
    assert attention_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.softmax(torch.randn(1, 1, 3, 3, generator=g), -1)  # other head count: head-averaged maps
    assert attention_loss(one, b).item() == pytest.approx(attention_loss(one, b.mean(1, keepdim=True)).item())


def test_smaller_student_learns_every_term_and_projections_go(tiny_calib):
    teacher, student = _llama(64, 4, seed=0), _llama(32, 2, seed=1)
    cfg = DistillConfig(steps=30, lr=3e-3, batch_size=4, logit_weight=1.0, feature_weight=1.0, attention_weight=1.0)
    loss = Distillation(teacher, student, cfg)
    assert loss.projections is not None and len(loss.projections) == 2
    impl = (student.config._attn_implementation, teacher.config._attn_implementation)
    windows = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(5))
    result = distill(student, teacher, windows, cfg)
    first, last = result.mean_loss(first=5), result.mean_loss(last=5)
    assert last < 0.8 * first  # measured 1.205 -> 0.742 (ratio 0.62)
    assert not hasattr(student, PROJECTIONS)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert (student.config._attn_implementation, teacher.config._attn_implementation) == impl


def test_same_width_student_needs_no_projection(tiny_llama):
    teacher = _llama(64, 2, seed=3)
    loss = Distillation(teacher, tiny_llama, DistillConfig(feature_weight=1.0))
    assert loss.projections is None


def test_bad_input_is_refused_before_work():
    with pytest.raises(LowbitError, match="vocabulary"):
        Distillation(_llama(32, 1, vocab=300), _llama(32, 1, vocab=256), DistillConfig())
    with pytest.raises(LowbitError, match="nothing to train"):
        DistillConfig(logit_weight=0.0)
    with pytest.raises(LowbitError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(LowbitError, match="unknown optimizer"):
        DistillConfig(optimizer="sgd9")
