"""Wanda: scores against a naive loop, N:M masks, and a statistic the pipeline feeds without knowing it."""

from __future__ import annotations

import pytest
import torch

from lowbit.core.sparsity import lowest_n_of_m, lowest_per_row, parse_pattern
from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.methods.statistics import ChannelNorm, LayerStats, SharedProducts
from lowbit.quantization import quantize
from lowbit.spec import preset


def test_channel_norm_is_the_l2_norm_over_all_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    stat, shared = ChannelNorm(), SharedProducts()
    for x in xs:
        stat.update(x, x.reshape(-1, 8), shared)
    st = LayerStats(nsamples=30)
    stat.write(st)
    ref = torch.cat([x.reshape(-1, 8) for x in xs]).pow(2).sum(0).sqrt()
    assert torch.allclose(st.extra["input_norm"], ref, rtol=1e-6)  # measured max rel diff 1e-7


def test_masks_against_naive_loops():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, 16, generator=g)
    m = lowest_per_row(s, 0.25)
    for r in range(6):
        assert set(torch.nonzero(m[r]).flatten().tolist()) == set(s[r].argsort()[:4].tolist())
    nm = lowest_n_of_m(s, 2, 4)
    for r in range(6):
        for b in range(4):
            blk = s[r, 4 * b: 4 * b + 4]
            assert set(torch.nonzero(nm[r, 4 * b: 4 * b + 4]).flatten().tolist()) == set(blk.argsort()[:2].tolist())
    assert parse_pattern("4:8") == (4, 8)
    with pytest.raises(ValueError, match="2:4"):
        parse_pattern("half")


def test_wanda_prunes_low_norm_channels_first():
    """A weight on a loud input channel survives a larger weight on a silent one (magnitude would differ)."""
    layer = torch.nn.Linear(4, 1, bias=False)
    layer.weight.data = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    stats = LayerStats(nsamples=1, extra={"input_norm": torch.tensor([100.0, 1.0, 1.0, 0.01])})
    prepared = get_method("wanda", preset("W8"), {"sparsity": 0.5}).prepare_layer("l", layer, stats)
    assert layer.weight.data.tolist() == [[1.0, 0.0, 3.0, 0.0]]  # scores 100, 2, 3, 0.04
    assert prepared.mask.tolist() == [[False, True, False, True]]


def test_wanda_then_gptq_keeps_2_of_4_zeros(tiny_llama, tiny_calib):
    report = quantize(tiny_llama, "wanda24-gptq-w4g64", tiny_calib, batch_size=4, progress=False)
    for layer in report.layers:
        assert layer["steps"] == ["wanda", "gptq"]
        assert layer["sparsity"] >= 0.5  # exactly 0.5 pruned; a GPTQ code may also land on 0
    w = tiny_llama.model.layers[0].mlp.up_proj.weight.data
    assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def test_bad_pattern_is_refused_before_work():
    with pytest.raises(LowbitError, match="pattern"):
        get_method("wanda", preset("W8"), {"pattern": "3:2"})
