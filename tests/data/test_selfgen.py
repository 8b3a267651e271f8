"""Self-generated calibration / training text (LLM-QAT's data-free scheme) on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lowbit.data import selfgen_windows
from lowbit.errors import LowbitError


class _Tok:
    all_special_ids = [0, 1]


def test_shape_seed_and_the_greedy_prefix(tiny_llama):
    a = selfgen_windows(tiny_llama, _Tok(), nsamples=5, seqlen=12, seed=3, greedy_prefix=3, batch_size=2)
    b = selfgen_windows(tiny_llama, _Tok(), nsamples=5, seqlen=12, seed=3, greedy_prefix=3, batch_size=2)
    assert a.shape == (5, 12) and torch.equal(a, b)  # seeded
    assert not set(a[:, 0].tolist()) & {0, 1}  # no special token starts a sequence
    with torch.no_grad():
        logits = tiny_llama(input_ids=a).logits
    greedy = logits[:, :3].argmax(-1)
    assert torch.equal(a[:, 1:4], greedy)  # the first tokens after the random one are the model's top-1
    assert not torch.equal(a[:, 4:], logits[:, 3:-1].argmax(-1))  # the rest is sampled, not greedy
    assert not torch.equal(a, selfgen_windows(tiny_llama, _Tok(), 5, 12, seed=4, batch_size=2))


def test_bad_sizes_are_refused(tiny_llama):
    with pytest.raises(LowbitError, match="nsamples >= 1 and seqlen >= 2"):
        selfgen_windows(tiny_llama, _Tok(), nsamples=0, seqlen=12)
