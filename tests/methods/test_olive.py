"""OliVe: the outlier-victim pair encoding against a naive per-pair reference, and the method end to end."""

from __future__ import annotations

import pytest
import torch

from lowbit.activations.quantizer import PairActQuantizer
from lowbit.core.affine import fake_quant_int
from lowbit.core.olive import abfloat_magnitudes, ovp_fake_quant, search_ovp_scale
from lowbit.errors import LowbitError
from lowbit.methods.base import get_method
from lowbit.quantization import quantize
from lowbit.spec import QuantSpec, preset


def test_abfloat_starts_above_the_normal_grid():
    assert abfloat_magnitudes(4).tolist() == [8, 12, 16, 24, 32, 48, 64, 96]
    m8 = abfloat_magnitudes(8)
    assert m8[0] == 128 and m8.numel() == 128 and m8[1] == 144  # (8 + 1) * 2^4


def _naive(x: torch.Tensor, s: float, bits: int) -> torch.Tensor:
    top = 2 ** (bits - 1) - 1
    grid = abfloat_magnitudes(bits).tolist()
    out = []
    for row in x.tolist():
        q = []
        for a, b in zip(row[0::2], row[1::2]):
            ya, yb = a / s, b / s
            if abs(ya) > top + 0.5 or abs(yb) > top + 0.5:
                big, first = (ya, True) if abs(ya) >= abs(yb) else (yb, False)
                v = min(grid, key=lambda g: abs(g - abs(big)))
                v = v if big >= 0 else -v
                q += [v, 0.0] if first else [0.0, v]
            else:
                q += [max(-top, min(top, round(ya))), max(-top, min(top, round(yb)))]
        out.append([v * s for v in q])
    return torch.tensor(out)


@pytest.mark.parametrize("bits", [4, 8])
def test_pair_encoding_matches_a_naive_reference(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 32, generator=g)
    x[torch.rand(16, 32, generator=g) < 0.05] *= 30.0  # sparse outliers
    s = 0.5 if bits == 4 else 0.02
    assert torch.allclose(ovp_fake_quant(x, s, bits), _naive(x, s, bits), atol=1e-6)


def test_pairs_beat_plain_int4_on_heavy_tailed_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[torch.rand(64, 256, generator=g) < 0.01] *= 12.0
    plain = fake_quant_int(w, QuantSpec(type="int", bits=4, granularity="channel"))
    ovp = ovp_fake_quant(w, search_ovp_scale(w, 4, per_row=True), 4)
    e_plain, e_ovp = [(q - w).pow(2).mean().item() for q in (plain, ovp)]
    assert e_ovp < e_plain / 5  # measured 0.029 vs 0.340


def test_pair_input_quantizer_calibrates_one_scale():
    q = PairActQuantizer(preset("A8_TENSOR"))
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 50.0
    q.observe(x)
    q.freeze()
    assert q.xmax.numel() == 1 and q.xmax < x.abs().max()  # outliers need not fit the normal grid
    assert (q(x) - x).pow(2).mean() < 0.01 * x.pow(2).mean()  # measured 1.1e-3 relative; scale 33.7 vs absmax 146


def test_w8a8_olive_runs_saves_and_reloads(tiny_llama, tiny_calib, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import save_quantized

    report = quantize(tiny_llama, "w8a8-olive", tiny_calib, progress=False)
    assert 8.125 <= report.bits_per_weight <= 8.25  # 8 bits + an fp16 scale per row of 64 or 128: measured 8.222
    with torch.no_grad():
        got = tiny_llama(tiny_calib[:2]).logits
    out, fmt = save_quantized(tiny_llama, None, report, tmp_path / "q")
    assert fmt == "fake-quant"
    back, _ = load_model(out, require_tokenizer=False)
    with torch.no_grad():
        assert (back(tiny_calib[:2]).logits - got).abs().max().item() < 1e-5  # measured 0.0


def test_bad_specs_are_refused():
    with pytest.raises(LowbitError, match="int4 or int8"):
        get_method("olive", QuantSpec(type="int", bits=3, granularity="channel"))
    with pytest.raises(LowbitError, match="static"):
        get_method("olive", QuantSpec(type="int", bits=8, granularity="channel"), activations=preset("A8_TOKEN"))
