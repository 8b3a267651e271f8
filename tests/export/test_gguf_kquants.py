"""K-quant super-blocks: the byte layouts decode (by gguf-py, llama.cpp's Python reference) to exactly the weights
their parts say, the scale fits equal naive transcriptions of llama.cpp's reference loops, and the encoded
tensors are closer to the weights than the legacy types of the same width."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.export.gguf_kquants import (encode_k, fit_scale_min, fit_symmetric, pack_q6_k,
                                        pack_qk_asym)

gguf = pytest.importorskip("gguf")


def _decode(data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    raw = quants.dequantize(data.numpy().reshape(shape[0], -1), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(shape)


@pytest.mark.parametrize("bits", [4, 5])
def test_qk_layout_decodes_to_its_parts(bits):
    g = torch.Generator().manual_seed(bits)
    nb = 6
    d, dmin = torch.rand(nb, generator=g).half().float(), torch.rand(nb, generator=g).half().float()
    sc, m = torch.randint(0, 64, (nb, 8), generator=g), torch.randint(0, 64, (nb, 8), generator=g)
    q = torch.randint(0, 1 << bits, (nb, 256), generator=g)
    want = (d[:, None, None] * sc[:, :, None].float()) * q.reshape(nb, 8, 32).float() - (
        dmin[:, None, None] * m[:, :, None].float())
    got = _decode(pack_qk_asym(d, dmin, sc, m, q, bits), f"Q{bits}_K", (nb, 256))
    assert torch.equal(got, want.reshape(nb, 256))  # bit-exact: the layout is gguf-py's


def test_q6k_layout_decodes_to_its_parts():
    g = torch.Generator().manual_seed(6)
    nb = 6
    d = torch.rand(nb, generator=g).half().float()
    sc, q = torch.randint(-128, 128, (nb, 16), generator=g), torch.randint(0, 64, (nb, 256), generator=g)
    want = (d[:, None, None] * sc[:, :, None].float()) * (q.reshape(nb, 16, 16) - 32).float()
    assert torch.equal(_decode(pack_q6_k(d, sc, q), "Q6_K", (nb, 256)), want.reshape(nb, 256))


def _naive_qkx2(x, w, nmax, rmin=-1.0, rdelta=0.1, nstep=20):
    """llama.cpp's make_qkx2_quants for one row, as its C loop reads (float64 here)."""
    x, w = x.double().tolist(), w.double().tolist()
    lo, hi = min(min(x), 0.0), max(x)
    sum_w, sum_x = sum(w), sum(a * b for a, b in zip(w, x))
    iscale = nmax / (hi - lo)
    scale, mn = 1 / iscale, lo
    q = [min(max(round(iscale * (v - lo)), 0), nmax) for v in x]
    best = sum(wi * (scale * l + mn - v) ** 2 for wi, l, v in zip(w, q, x))
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - lo)
        q = [min(max(round(iscale * (v - lo)), 0), nmax) for v in x]
        sl = sum(wi * l for wi, l in zip(w, q))
        sl2 = sum(wi * l * l for wi, l in zip(w, q))
        sxl = sum(wi * l * v for wi, l, v in zip(w, q, x))
        det = sum_w * sl2 - sl * sl
        if det > 0:
            s, m_ = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
            if m_ > 0:
                s, m_ = sxl / sl2, 0.0
            e = sum(wi * (s * l + m_ - v) ** 2 for wi, l, v in zip(w, q, x))
            if e < best:
                best, scale, mn = e, s, m_
    return scale, -mn


def test_scale_min_fit_is_make_qkx2_quants():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, generator=g) * 0.02
    w = x.abs() + 0.01  # llama.cpp-like importance: larger weights count more
    scale, mn = fit_scale_min(x, w, 15)
    for r in range(12):
        s_ref, m_ref = _naive_qkx2(x[r], w[r], 15)
        assert scale[r].item() == pytest.approx(s_ref, rel=1e-4)  # float32 vs float64 sums: measured <= 2e-6
        assert mn[r].item() == pytest.approx(m_ref, rel=1e-4, abs=1e-7)


def test_symmetric_fit_beats_absmax_and_keeps_the_peak_sign():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 16, generator=g)
    w = torch.ones_like(x)
    scale = fit_symmetric(x, w, 32)
    q = torch.round(x / scale[:, None]).clamp(-32, 31)
    err = (scale[:, None] * q - x).square().sum(1)
    absmax = x.abs().amax(1, keepdim=True) / 31
    err_absmax = (absmax * torch.round(x / absmax).clamp(-32, 31) - x).square().sum(1)
    assert bool((err <= err_absmax + 1e-6).all())  # the search includes a scale at least as good


@pytest.mark.parametrize("type_name, legacy", [("Q4_K", "Q4_0"), ("Q5_K", "Q5_0"), ("Q6_K", "Q8_0")])
def test_k_types_hold_llm_like_weights_at_least_as_well_as_legacy_ones(type_name, legacy):
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 512, generator=g) * 0.02
    w[3, 7] = 0.4  # an outlier weight
    err = (_decode(encode_k(w, type_name), type_name, tuple(w.shape)) - w).norm() / w.norm()
    ref = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType[legacy]),
                            GGMLQuantizationType[legacy])
    err_legacy = (torch.from_numpy(ref) - w).norm() / w.norm()
    bits = {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}[type_name]
    assert err < (err_legacy if legacy != "Q8_0" else 4 * err_legacy)  # measured 0.077 vs 0.097 (Q4), 0.038 vs
    assert encode_k(w, type_name).numel() * 8 / w.numel() == bits  # 0.048 (Q5), Q6_K 0.020 vs Q8_0 0.006


def test_an_imatrix_moves_error_off_the_important_columns():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * 0.02
    imatrix = torch.ones(256)
    imatrix[::4] = 100.0  # every 4th input column carries most of the activation energy
    plain = _decode(encode_k(w, "Q4_K"), "Q4_K", tuple(w.shape))
    weighted = _decode(encode_k(w, "Q4_K", imatrix), "Q4_K", tuple(w.shape))
    err = lambda r: ((r - w).square() * imatrix).sum().item()  # noqa: E731 - the imatrix-weighted error
    assert err(weighted) < err(plain)  # measured 0.65x
