"""What the pruning steps share: N:M for every pruner, kept masks, and OWL's non-uniform block sparsity."""

from __future__ import annotations

import pytest
import torch

from lowbit.core.sparsity import owl_sparsities
from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.methods.pruning import block_of
from lowbit.methods.statistics import LayerStats
from lowbit.quantization import quantize
from lowbit.spec import preset


def test_owl_sparsities_against_the_papers_formula():
    ratios = torch.tensor([0.010, 0.030, 0.020, 0.050], dtype=torch.float64)
    lam, target = 0.08, 0.7
    got = owl_sparsities(ratios, target, lam)
    # OWL's reference: rescale to [0, 2 lam], centre on the density 1 - target, sparsity = 1 - density
    scaled = [(r - 0.010) / (0.050 - 0.010) * 2 * lam for r in ratios.tolist()]
    mean = sum(scaled) / 4
    ref = [1 - (x - mean + (1 - target)) for x in scaled]
    assert got.tolist() == pytest.approx(ref, abs=1e-12)
    assert got.mean().item() == pytest.approx(target, abs=1e-12)
    assert got.max().item() - got.min().item() == pytest.approx(2 * lam)
    assert int(got.argmin()) == 3  # the most outliers: the least pruned
    assert owl_sparsities(torch.tensor([0.02, 0.02]), 0.5, 0.08).tolist() == [0.5, 0.5]


def test_block_of_layer_names():
    assert block_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert block_of("transformer.h.11.attn.c_attn") == "transformer.h.11"


def test_magnitude_takes_n_of_m_and_keeps_an_earlier_mask():
    layer = torch.nn.Linear(8, 2, bias=False)
    layer.weight.data = torch.tensor([[1.0, -4, 3, 2, 8, 7, -6, 5], [5, 6, 7, 8, 1, 2, 3, 4]])
    prior = torch.zeros(2, 8, dtype=torch.bool)
    prior[0, 1] = True  # the largest of its group: pruned anyway, and counted among the 2
    prep = get_method("magnitude", preset("W8"), {"pattern": "2:4"}).prepare_layer(
        "l", layer, LayerStats(mask=prior))
    assert prep.mask.tolist() == [[True, True, False, False, False, False, True, True],
                                  [True, True, False, False, True, True, False, False]]


def test_owl_gives_outlier_heavy_blocks_less_sparsity(tiny_llama, tiny_calib):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # block 1: 5% of its weights x10, a heavy tail (block 0 stays Gaussian: ~no outliers)
        for m in tiny_llama.model.layers[1].modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(1 + 9 * (torch.rand(m.weight.shape, generator=g) < 0.05))
    recipe = {"name": "owl", "methods": [{"method": "wanda", "ignore": ["lm_head"],
                                          "options": {"sparsity": 0.5, "owl": True, "owl_lambda": 0.1}}]}
    report = quantize(tiny_llama, recipe, tiny_calib, batch_size=4, progress=False)
    by_block: dict[int, list[float]] = {0: [], 1: []}
    for layer in report.layers:
        by_block[int(layer["name"].split(".")[2])].append(layer["sparsity"])
    s0, s1 = (sum(v) / len(v) for v in by_block.values())
    assert s0 == pytest.approx(0.6, abs=0.01) and s1 == pytest.approx(0.4, abs=0.01)  # 0.5 +- lambda, two blocks


def test_owl_refuses_patterns_and_too_wide_a_lambda():
    with pytest.raises(LowbitError, match="drop pattern or owl"):
        get_method("wanda", preset("W8"), {"pattern": "2:4", "owl": True})
    with pytest.raises(LowbitError, match="owl_lambda"):
        get_method("magnitude", preset("W8"), {"sparsity": 0.05, "owl": True, "owl_lambda": 0.1})
