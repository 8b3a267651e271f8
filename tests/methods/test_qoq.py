"""QoQ progressive group quantization: integer second level, int8-exact products, protective range."""

from __future__ import annotations

import torch

from lowbit.methods.qoq import PROTECTIVE, progressive_quantize
from lowbit.quantization import quantize


def test_second_level_products_are_int8_and_reconstruct():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[3, 7] = 25.0  # an outlier sets its row's first-level scale
    r = progressive_quantize(w, 64)
    q8 = r["s2"].float().repeat_interleave(64, 1) * (r["q4"].float() - r["z"].float().repeat_interleave(64, 1))
    assert torch.equal(q8, r["q8"])
    assert q8.abs().max() <= 127 and torch.equal(q8, q8.round())  # exactly an int8 value (protective range 119)
    assert r["q4"].max() <= 15 and r["s2"].min() >= 1
    s1 = r["s1"].float().view(-1, 1)
    assert torch.allclose(r["weight"], q8 * s1)
    # each int8 value lands within one second-level step of the first-level code
    q8_first = torch.clamp(torch.round(w / s1), -PROTECTIVE, PROTECTIVE)
    assert ((q8 - q8_first).abs() <= r["s2"].float().repeat_interleave(64, 1)).all()


def test_w4a8_qoq_recipe_runs(tiny_llama, tiny_calib):
    recipe = {"name": "q", "transforms": [{"transform": "quarot", "options": {"online_down": False}}],
              "methods": [{"method": "qoq", "spec": {"type": "int", "bits": 4, "granularity": "group", "group_size": 32,
                                                     "symmetric": False, "signed": False}, "activations": "A8_TOKEN"}]}
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    report = quantize(tiny_llama, recipe, tiny_calib, progress=False)
    # 4-bit codes + 8-bit scale and 4-bit zero per 32 + an fp16 row scale
    assert abs(report.layers[0]["bits_per_weight"] - (4 + 12 / 32 + 16 / 64)) < 1e-9
    with torch.no_grad():
        rel = ((tiny_llama(tiny_calib[:2]).logits - ref).norm() / ref.norm()).item()
    assert rel < 0.2  # measured 0.086 on the random tiny model
