"""Perplexity, KL and top-1 arithmetic against hand computations."""

from __future__ import annotations

import copy
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


def test_chunked_logits_match_full_logits(tiny_llama, tiny_calib):
    """Slicing the head's positions (chunk 5 over 32-token windows, uneven last chunk) changes nothing."""
    from lowbit.eval.logits import has_plain_head

    ref = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # a reference that differs
    assert has_plain_head(tiny_llama)
    full = window_metrics(tiny_llama, tiny_calib, reference=ref, chunk=0)
    sliced = window_metrics(tiny_llama, tiny_calib, reference=ref, chunk=5)
    assert math.isclose(full["nll_sum"], sliced["nll_sum"], rel_tol=1e-6)  # measured rel 1e-8
    # KL is a small sum of log-prob differences: fp32 cancellation gives rel 5.3e-5 (0.0142564 vs 0.0142557)
    assert math.isclose(full["kl_sum"], sliced["kl_sum"], rel_tol=2e-4)
    assert full["count"] == sliced["count"] == 8 * 31
    assert full["agree"] == sliced["agree"] and full["positions"] == sliced["positions"] == 8 * 32


def test_softcapped_head_is_never_sliced(tiny_llama):
    from lowbit.eval.logits import has_plain_head, logit_chunks

    tiny_llama.config.final_logit_softcapping = 30.0
    assert not has_plain_head(tiny_llama)
    pieces = list(logit_chunks(tiny_llama, torch.zeros(1, 12, dtype=torch.long), 4))
    assert len(pieces) == 1 and pieces[0][1].shape == (1, 12, 256)
