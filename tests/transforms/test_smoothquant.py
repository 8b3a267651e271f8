"""SmoothQuant: the scale formula, exact equivalence before quantization, and outliers removed."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.base import get_method
from lowbit.models.capture import capture_block_inputs, run_block
from lowbit.pipeline.sequential import BlockContext
from lowbit.quantization import quantize
from lowbit.spec import preset
from lowbit.transforms import get_transform
from lowbit.transforms.smoothquant import smoothing_scales


def test_scales_match_the_paper_formula():
    x = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(x, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))  # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)
    assert s[2] == 1.0 and s[3] == 1.0  # dead channels are left alone


def _smooth_all_blocks(model, calib, transform):
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks[0], calib, 4)
    method = get_method("rtn", preset("W8"), activations=preset("A8_TOKEN"))
    for i, block in enumerate(blocks):
        prefix = f"model.layers.{i}."
        layers = {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)}
        transform.apply_block(BlockContext(model, block, i, prefix, inputs, layers, {n: method for n in layers}))
        inputs = run_block(block, inputs)


@pytest.mark.parametrize("options", [{"alpha": 0.5}, {"alpha": "search", "groups": "all"}])
def test_smoothing_leaves_the_fp_model_unchanged(tiny_llama, tiny_calib, options):
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    t = get_transform("smoothquant", options)
    _smooth_all_blocks(tiny_llama, tiny_calib, t)
    with torch.no_grad():
        got = tiny_llama(tiny_calib[:2]).logits
    assert (got - ref).abs().max().item() < 1e-5  # measured 1.8e-7 (alpha 0.5) and 2.1e-7 (search)
    assert {r["prev"] for r in t.records if "alpha" in r} >= {"input_layernorm", "post_attention_layernorm"}


def test_outlier_channels_shrink(tiny_llama, tiny_calib):
    with torch.no_grad():  # give the attention norm's output two outlier channels
        for layer in tiny_llama.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 40.0
    t = get_transform("smoothquant", {"alpha": 0.5})
    _smooth_all_blocks(tiny_llama, tiny_calib, t)
    r = next(r for r in t.records if r["prev"] == "input_layernorm")
    assert r["max_x_after"] < r["max_x_before"] / 4  # measured 131.5 -> 2.7 in block 0


def test_bad_options_are_refused_before_work():
    with pytest.raises(LowbitError, match="alpha must be in"):
        get_transform("smoothquant", {"alpha": 1.5})
    with pytest.raises(LowbitError, match="has no option"):
        get_transform("smoothquant", {"beta": 1})
    with pytest.raises(LowbitError, match="unknown transform"):
        get_transform("smoothquant2")


def test_recipe_runs_end_to_end(tiny_llama, tiny_calib):
    report = quantize(tiny_llama, "w8a8-smoothquant", tiny_calib, progress=False)
    recs = report.extra["transforms"]["smoothquant"]
    assert len([r for r in recs if "alpha" in r]) == 6  # q/k/v, gate/up and up->down in each of two blocks
    assert any("grouped-query" in r.get("skipped", "") for r in recs)  # v->o: 32 value channels, 64 o_proj inputs


def test_os_plus_scaling_is_exact_before_quantization(tiny_llama, tiny_calib):
    """The scales fold into the weights (the shifts only act inside the input quantizers)."""
    from lowbit.transforms.os_plus import os_plus_params

    z, s = os_plus_params(torch.tensor([-1.0, 0.0, -10.0]), torch.tensor([3.0, 2.0, 30.0]), 5.0)
    assert torch.equal(z, torch.tensor([1.0, 1.0, 10.0])) and torch.equal(s, torch.tensor([1.0, 1.0, 4.0]))
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    t = get_transform("os_plus")
    _smooth_all_blocks(tiny_llama, tiny_calib, t)
    with torch.no_grad():
        got = tiny_llama(tiny_calib[:2]).logits
    assert (got - ref).abs().max().item() < 1e-5  # measured 1.5e-7
    assert len([r for r in t.records if "threshold" in r]) == 6


def test_shifted_quantizer_helps_an_asymmetric_channel():
    from lowbit.activations import ActQuantizer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    x[:, 2] = x[:, 2] * 0.5 + 40.0  # a channel living in [38, 42]
    plain = ActQuantizer(preset("A8_TENSOR"))
    shifted = ActQuantizer(preset("A8_TENSOR"))
    shifted.shift = torch.tensor([0, 0, 40.0, 0, 0, 0, 0, 0])
    for q in (plain, shifted):
        q.observe(x)
        q.freeze()
    err = [(q(x) - x).pow(2).mean().item() for q in (plain, shifted)]
    assert err[1] < err[0] / 20  # measured 8.7e-5 vs 8.9e-3


def test_os_plus_recipe_runs(tiny_llama, tiny_calib):
    report = quantize(tiny_llama, "w8a8-os-plus", tiny_calib, progress=False)
    assert report.extra["transforms"]["os_plus"]
