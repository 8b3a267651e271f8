"""Perplexity, KL and top-1 arithmetic against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from lowbit.eval.nll import kl_and_top1, shifted_nll_sum
from lowbit.eval.perplexity import window_metrics


def test_shifted_nll_by_hand():
    # vocab 2, one sequence [0, 1, 1]: positions 0 and 1 predict tokens 1 and 1.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    # p(1 | pos0) = 1/2; p(1 | pos1) = 1/(3+1) = 1/4  -> nll = ln 2 + ln 4 = ln 8
    assert math.isclose(shifted_nll_sum(logits, ids).item(), math.log(8.0), rel_tol=1e-6)


def test_kl_and_top1_by_hand():
    ref = torch.tensor([[[math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]]])
    approx = torch.tensor([[[math.log(0.25), math.log(0.75)], [math.log(0.9), math.log(0.1)]]])
    kl, agree = kl_and_top1(ref, approx)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # second position: 0
    assert math.isclose(kl.item(), expected, rel_tol=1e-5)
    assert agree.item() == 1  # position 0: argmax 0 vs 1 differ; position 1 agrees


class _UniformLM(torch.nn.Module):
    """A toy LM whose next-token distribution is uniform over ``vocab`` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, n, self.vocab) + self.w)


def test_uniform_model_perplexity_equals_vocab():
    windows = torch.randint(0, 7, (3, 5))
    m = window_metrics(_UniformLM(7), windows)
    assert m["count"] == 3 * 4  # seqlen - 1 predictions per window
    assert math.isclose(math.exp(m["nll_sum"] / m["count"]), 7.0, rel_tol=1e-6)
    r = window_metrics(_UniformLM(7), windows, reference=_UniformLM(7))
    assert r["kl_sum"] == 0.0 and r["positions"] == 15
