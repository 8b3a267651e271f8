"""ZeroQuant-FP: power-of-two FP4 scales and LoRC low-rank error compensation."""

from __future__ import annotations

import torch

from lowbit.core.quant import dequantize, quantize
from lowbit.methods.lorc import lorc_factors
from lowbit.quantization import quantize as quantize_model
from lowbit.spec import QuantSpec

FP4 = QuantSpec(type="float", fmt="e2m1", bits=4, granularity="group", group_size=32, pow2_scale=True)


def test_lorc_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(48, 32, generator=g, dtype=torch.float64)
    a, b = lorc_factors(e, torch.zeros_like(e), 4)
    u, s, vh = torch.linalg.svd(e)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(a.double() @ b.double(), best, atol=2e-2)  # fp16 factors: measured 9e-4
    rest = (e - a.double() @ b.double()).norm() ** 2
    assert abs(rest - (s[4:] ** 2).sum()) / (s[4:] ** 2).sum() < 1e-3  # Eckart-Young: the tail energy remains


def test_pow2_scales_and_lorc_reduce_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    qt = quantize(w, FP4)
    scales = qt.group_scales().flatten()
    assert torch.equal(torch.log2(scales), torch.log2(scales).round())  # powers of two
    wq = dequantize(qt)
    a, b = lorc_factors(w, wq, 8)
    before, after = (w - wq).norm(), (w - wq - a.float() @ b.float()).norm()
    assert after < before * 0.95  # measured 0.84 of the error left at rank 8 of 64


def test_recipe_counts_the_factors(tiny_llama, tiny_calib):
    report = quantize_model(tiny_llama, "w4a8-zeroquant-fp", tiny_calib, progress=False)
    q = next(l for l in report.layers if l["shape"] == [64, 64] or l["shape"] == (64, 64))
    # 4-bit elements + an fp32 scale per 64 + two rank-8 fp16 factors (64 + 64) x 8
    assert abs(q["bits_per_weight"] - (4 + 32 / 64 + (64 + 64) * 8 * 16 / (64 * 64))) < 1e-9
