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


def _naive_qkx2(x, w, nmax, rmin=-1.0, rdelta=0.1, nstep=20, mad=False):
    """llama.cpp's make_qkx2_quants for one row, as its C loop reads (float64 here): each candidate grid starts at
    the best offset found so far (``min`` is overwritten inside the loop)."""
    x, w = x.double().tolist(), w.double().tolist()
    lo, hi = min(min(x), 0.0), max(x)
    sum_w, sum_x = sum(w), sum(a * b for a, b in zip(w, x))
    iscale = nmax / (hi - lo)
    scale, mn = 1 / iscale, lo
    q = [min(max(round(iscale * (v - lo)), 0), nmax) for v in x]
    def cost(d):
        return abs(d) if mad else d * d

    best = sum(wi * cost(scale * l + mn - v) for wi, l, v in zip(w, q, x))
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - mn)
        q = [min(max(round(iscale * (v - mn)), 0), nmax) for v in x]
        sl = sum(wi * l for wi, l in zip(w, q))
        sl2 = sum(wi * l * l for wi, l in zip(w, q))
        sxl = sum(wi * l * v for wi, l, v in zip(w, q, x))
        det = sum_w * sl2 - sl * sl
        if det > 0:
            s, m_ = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
            if m_ > 0:
                s, m_ = sxl / sl2, 0.0
            e = sum(wi * cost(s * l + m_ - v) for wi, l, v in zip(w, q, x))
            if e < best:
                best, scale, mn = e, s, m_
    return scale, -mn


@pytest.mark.parametrize("nmax,args,mad", [(15, (-1.0, 0.1, 20), False), (31, (-0.5, 0.1, 15), False),
                                            (3, (-0.5, 0.1, 15), True)])
def test_scale_min_fit_is_make_qkx2_quants(nmax, args, mad):
    """Q4_K's, Q5_K's and Q2_K's (absolute-error) settings against the C loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, generator=g) * 0.02
    w = x.abs() + 0.01  # llama.cpp-like importance: larger weights count more
    scale, mn = fit_scale_min(x, w, nmax, *args, mad=mad)
    for r in range(12):
        s_ref, m_ref = _naive_qkx2(x[r], w[r], nmax, *args, mad=mad)
        assert scale[r].item() == pytest.approx(s_ref, rel=1e-4)  # float32 vs float64 sums: measured <= 2e-6
        assert mn[r].item() == pytest.approx(m_ref, rel=1e-4, abs=1e-7)


def test_symmetric_fit_beats_absmax_and_keeps_the_peak_sign():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 16, generator=g)
    w = torch.ones_like(x)
    scale, codes = fit_symmetric(x, w, 32)
    assert bool((codes >= -32).all() and (codes <= 31).all())
    q = torch.round(x / scale[:, None]).clamp(-32, 31)
    err = (scale[:, None] * q - x).square().sum(1)
    absmax = x.abs().amax(1, keepdim=True) / 31
    err_absmax = (absmax * torch.round(x / absmax).clamp(-32, 31) - x).square().sum(1)
    assert bool((err <= err_absmax + 1e-6).all())  # the search includes a scale at least as good


@pytest.mark.parametrize("type_name, legacy", [("Q4_K", "Q4_0"), ("Q5_K", "Q5_0"), ("Q6_K", "Q8_0"), ("Q3_K", "Q4_0"),
                                               ("Q2_K", "Q4_0")])
def test_k_types_hold_llm_like_weights_at_least_as_well_as_legacy_ones(type_name, legacy):
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 512, generator=g) * 0.02
    w[3, 7] = 0.4  # an outlier weight
    err = (_decode(encode_k(w, type_name), type_name, tuple(w.shape)) - w).norm() / w.norm()
    ref = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType[legacy]),
                            GGMLQuantizationType[legacy])
    err_legacy = (torch.from_numpy(ref) - w).norm() / w.norm()
    bits = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}[type_name]
    # measured 0.077 vs 0.097 (Q4_K vs Q4_0), 0.038 vs 0.048 (Q5), Q6_K 0.020 vs Q8_0 0.006; the low-bit ones stay
    # within a factor of Q4_0's error: Q3_K 0.16, Q2_K 0.31 vs 0.097
    factor = {"Q8_0": 4}.get(legacy, 1) * {"Q3_K": 2, "Q2_K": 4}.get(type_name, 1)
    assert err < factor * err_legacy
    assert encode_k(w, type_name).numel() * 8 / w.numel() == bits


def test_an_imatrix_moves_error_off_the_important_columns():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * 0.02
    imatrix = torch.ones(256)
    imatrix[::4] = 100.0  # every 4th input column carries most of the activation energy
    plain = _decode(encode_k(w, "Q4_K"), "Q4_K", tuple(w.shape))
    weighted = _decode(encode_k(w, "Q4_K", imatrix), "Q4_K", tuple(w.shape))
    err = lambda r: ((r - w).square() * imatrix).sum().item()  # noqa: E731 - the imatrix-weighted error
    assert err(weighted) < err(plain)  # measured 0.65x


def test_q3k_and_q2k_layouts_decode_to_their_parts():
    """Random parts packed by lowbit read back through gguf-py's dequantizers, value for value."""
    from lowbit.export.gguf_kquants import pack_q2_k, pack_q3_k

    g = torch.Generator().manual_seed(4)
    nb = 3
    d = torch.rand(nb, generator=g).half().float()
    sc, q = torch.randint(0, 64, (nb, 16), generator=g), torch.randint(0, 8, (nb, 256), generator=g)
    want = (d[:, None, None] * (sc[:, :, None] - 32).float()) * (q.reshape(nb, 16, 16) - 4).float()
    assert torch.equal(_decode(pack_q3_k(d, sc, q), "Q3_K", (nb, 256)), want.reshape(nb, 256))
    dmin = torch.rand(nb, generator=g).half().float()
    sc, m = torch.randint(0, 16, (nb, 16), generator=g), torch.randint(0, 16, (nb, 16), generator=g)
    q = torch.randint(0, 4, (nb, 256), generator=g)
    want = (d[:, None, None] * sc[:, :, None].float()) * q.reshape(nb, 16, 16).float() \
        - (dmin[:, None, None] * m[:, :, None].float())
    assert torch.allclose(_decode(pack_q2_k(d, dmin, sc, m, q), "Q2_K", (nb, 256)), want.reshape(nb, 256),
                          rtol=0, atol=1e-6)  # gguf-py forms d*sc*q - dmin*m in another order: measured 6e-8


def test_q3_refit_is_make_q3_quants():
    """The greedy refit against a per-element loop as the C code runs it."""
    from lowbit.export.gguf_kquants import fit_q3

    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 16, generator=g)

    def naive(row):
        v = row.double().tolist()
        peak = max(v, key=abs)
        q = [min(max(round(-4 / peak * a), -4), 3) for a in v]
        w = [a * a for a in v]
        slx = sum(wi * a * l for wi, a, l in zip(w, v, q))
        sl2 = sum(wi * l * l for wi, l in zip(w, q))
        for _ in range(5):
            changed = 0
            for i, a in enumerate(v):
                s1 = slx - w[i] * a * q[i]
                if s1 > 0:
                    s2 = sl2 - w[i] * q[i] * q[i]
                    new = min(max(round(a * s2 / s1), -4), 3)
                    if new != q[i]:
                        s1 += w[i] * a * new
                        s2 += w[i] * new * new
                        if s2 > 0 and s1 * s1 * sl2 > slx * slx * s2:
                            q[i], slx, sl2, changed = new, s1, s2, changed + 1
            if not changed:
                break
        return slx / sl2

    got = fit_q3(x)
    for r in range(10):
        assert got[r].item() == pytest.approx(naive(x[r]), rel=1e-5)  # float32 vs float64: measured <= 1e-6


def test_iq4nl_picks_the_nearest_grid_value_and_decodes_in_gguf_py():
    from lowbit.export.gguf_iq4nl import KVALUES, encode_iq4_nl, nearest_index

    v = torch.tensor([-200.0, -115.5, -115.4, 0.0, 7.0, 112.0, 500.0])
    # -115.5 is halfway between -127 and -104: ties go to the larger value, as best_index_int8 does
    assert [KVALUES[i] for i in nearest_index(v).tolist()] == [-127, -104, -104, 1, 13, 113, 113]
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 64, generator=g) * 0.02
    err = (_decode(encode_iq4_nl(w), "IQ4_NL", tuple(w.shape)) - w).norm() / w.norm()
    assert err < 0.09  # measured 0.077 (4.5 bits per weight)


def test_mix_rules_follow_llama_cpp():
    from lowbit.export.gguf_mix import mix_type

    n = 30
    # Q4_K_M: attn_v / ffn_down at Q6_K in the use_more_bits layers (0-2, 5, 8, ..., 26-29)
    assert [mix_type(f"blk.{i}.ffn_down.weight", "Q4_K_M", n, 1536) for i in (0, 3, 5, 27)] == \
        ["Q6_K", "Q4_K", "Q6_K", "Q6_K"]
    assert mix_type("blk.4.attn_q.weight", "Q4_K_M", n, 512) == "Q4_K"
    # rows of 576 weights are not K-quantizable: llama.cpp's fallbacks
    assert mix_type("blk.4.attn_q.weight", "Q4_K_M", n, 576) == "Q5_0"
    assert mix_type("blk.0.attn_v.weight", "Q4_K_M", n, 576) == "Q8_0"
    assert mix_type("blk.4.attn_q.weight", "Q3_K_M", n, 576) == "Q4_0"
    # Q3_K_M: attn_v Q5_K in the first two layers then Q4_K, attn_output Q4_K, ffn_down Q5_K in the first 1/16
    assert [mix_type(f"blk.{i}.attn_v.weight", "Q3_K_M", n, 512) for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert mix_type("blk.9.attn_output.weight", "Q3_K_M", n, 512) == "Q4_K"
    assert [mix_type(f"blk.{i}.ffn_down.weight", "Q3_K_M", n, 512) for i in (0, 1, 2)] == ["Q5_K", "Q4_K", "Q4_K"]
    # the head is Q6_K; a tied token embedding is the head; a 576-wide head is Q8_0
    assert mix_type("output.weight", "Q3_K_M", n, 512) == "Q6_K"
    assert mix_type("token_embd.weight", "Q4_K_M", n, 512, has_output=False) == "Q6_K"
    assert mix_type("token_embd.weight", "Q4_K_M", n, 576, has_output=False) == "Q8_0"
    assert mix_type("token_embd.weight", "Q4_K_M", n, 512, has_output=True) == "Q4_K"
