"""LLM.int8(): the outlier decomposition against a naive reference, and the method on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lowbit.activations import input_quantizers
from lowbit.activations.quantizer import OutlierActQuantizer
from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import check_exportable
from lowbit.quantization import quantize
from lowbit.spec import preset


def _naive(x: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """X_O W_O^T in full precision + per-token int8 X_~O times row-wise int8 W_~O (dequantized)."""
    cols = (x.abs() >= threshold).any(0)
    sw = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / sw).clamp(-128, 127) * sw
    xr = x[:, ~cols]
    sx = xr.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xr / sx).clamp(-128, 127) * sx
    return x[:, cols] @ wq[:, cols].T + xq @ wq[:, ~cols].T


def test_decomposition_matches_the_naive_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g)
    x[:, [5, 40]] *= 20  # two outlier features
    w = torch.randn(48, 64, generator=g) / 8
    q = OutlierActQuantizer(preset("A8_TOKEN").replace(full_range=False), 6.0)
    sw = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / sw).clamp(-128, 127) * sw
    got = q(x) @ wq.T
    assert q.outlier_columns == 2
    assert torch.allclose(got, _naive(x, w, 6.0), atol=1e-5)  # measured max diff 5.2e-6 (fp32 summation order)


def test_outlier_columns_rescue_the_regular_ones():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g)
    x[:, 7] *= 60
    plain = OutlierActQuantizer(preset("A8_TOKEN").replace(full_range=False), float("inf"))
    mixed = OutlierActQuantizer(preset("A8_TOKEN").replace(full_range=False), 6.0)
    err_plain = (plain(x) - x).pow(2).mean()
    err_mixed = (mixed(x) - x).pow(2).mean()
    assert err_mixed < err_plain / 10  # measured 4.4e-5 vs 2.4e-2


def test_method_on_tiny_model(tiny_llama, tiny_calib):
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    report = quantize(tiny_llama, "w8a8-llmint8", tiny_calib, progress=False)
    qs = input_quantizers(tiny_llama)
    assert len(qs) == 14 and all(isinstance(q, OutlierActQuantizer) for q in qs.values())
    with torch.no_grad():
        got = tiny_llama(tiny_calib[:2]).logits
    assert (got - ref).abs().max().item() < 0.02  # measured 6.8e-3
    assert 8 + 32 / 128 < report.bits_per_weight < 8 + 32 / 64  # int8 + an fp32 row scale over 64 or 128 inputs: 8.444
    assert "no compressed-tensors form" in check_exportable(tiny_llama)  # per-column outlier handling


def test_activation_spec_is_refused(tiny_llama, tiny_calib):
    recipe = {"name": "x", "methods": [{"method": "llmint8", "spec": "W8", "activations": "A8_TOKEN"}]}
    with pytest.raises(LowbitError, match="quantizes its layer inputs its own way"):
        quantize(tiny_llama, recipe, tiny_calib, progress=False)
