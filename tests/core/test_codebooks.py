"""Tests for lowbit.core.codebooks: NF4 (+double quant), k-means/LUT, log, binary, ternary, BCQ."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core.codebooks import (
    NF4_LEVELS,
    bcq_fit,
    bcq_greedy,
    bcq_planes,
    binary_rows,
    dequantize_codebook,
    derive_nf4_levels,
    double_quantize,
    fake_quant_codebook,
    kmeans_rows,
    log_levels,
    log_rows,
    nearest_level,
    nf4_levels,
    quantize_codebook,
    storage_bits_per_weight,
    ternary_rows,
)
from lowbit.spec import QuantSpec, preset

PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
NF4_NODQ = preset("NF4").replace(double_quant=None)


def cb(fmt: str, bits: int, granularity: str = "channel", **kw) -> QuantSpec:
    return QuantSpec(type="codebook", fmt=fmt, bits=bits, granularity=granularity, **kw)


def rel_mse(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.float() - x.float()).square().sum() / x.float().square().sum())


def brute_nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """argmin |v - level| in fp64; on a tie the lower level wins; levels (K,) or (G, K)."""
    lv = levels.double()
    lv = lv[None, None, :] if lv.dim() == 1 else lv[:, None, :]
    d = (v.double()[..., None] - lv).abs()
    tied = d == d.min(dim=-1, keepdim=True).values
    return torch.where(tied, lv.expand_as(d), torch.inf).argmin(dim=-1)


# ------------------------------------------------------------------------------------------ NF4
def test_nf4_levels_are_the_published_values() -> None:
    lv = nf4_levels()
    assert lv.dtype == torch.float32 and lv.numel() == 16
    assert torch.equal(lv, torch.tensor(PUBLISHED_NF4))
    assert list(NF4_LEVELS) == PUBLISHED_NF4
    assert (lv == 0).sum() == 1 and lv[0] == -1 and lv[-1] == 1
    assert (lv > 0).sum() == 8 and (lv < 0).sum() == 7  # asymmetric halves


def test_nf4_derivation_from_normal_quantiles() -> None:
    # bitsandbytes' procedure (offset 0.9677083, fp32 linspace): measured max diff 0.0 (bit-exact)
    assert torch.equal(derive_nf4_levels(), nf4_levels())
    # the unrounded offset (1 - 1/30 + 1 - 1/32) / 2: measured max diff 2.98e-7
    exact_offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    assert (derive_nf4_levels(exact_offset) - nf4_levels()).abs().max() < 1e-6


def test_nearest_level_matches_brute_force_including_ties() -> None:
    torch.manual_seed(0)
    lv = nf4_levels()
    mids32 = ((lv[:-1].double() + lv[1:].double()) / 2).float()
    near = torch.cat([mids32, torch.nextafter(mids32, mids32 + 1), torch.nextafter(mids32, mids32 - 1)])
    v = torch.cat([torch.rand(4000) * 2.2 - 1.1, lv, near, torch.tensor([0.0, -0.0, 5.0, -5.0])])
    v = v.reshape(1, -1)
    assert torch.equal(nearest_level(v, lv), brute_nearest(v, lv))
    # per-row unsorted tables (k-means / BCQ); exact ties on small dyadic values
    table = torch.randn(6, 8)
    vv = torch.cat([torch.randn(6, 300), table, (table[:, :4] + table[:, 4:]) / 2], dim=1)
    assert torch.equal(nearest_level(vv, table), brute_nearest(vv, table))
    dyadic = torch.tensor([[-1.0, 0.5, 0.0, 0.25]])
    vd = torch.tensor([[0.125, 0.375, -0.5, 0.75, 2.0]])
    assert torch.equal(nearest_level(vd, dyadic), brute_nearest(vd, dyadic))


def test_nf4_codes_match_brute_force_reference() -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 256)
    qt = quantize_codebook(x, NF4_NODQ)
    xg = x.reshape(-1, 64)
    absmax = xg.abs().amax(dim=1, keepdim=True)
    ref = brute_nearest(xg / absmax, nf4_levels())
    assert qt.codes.dtype == torch.uint8 and torch.equal(qt.codes.long(), ref)
    assert torch.equal(qt.scales, absmax.squeeze(1))
    assert torch.equal(dequantize_codebook(qt), (nf4_levels()[ref] * absmax).reshape(16, 256))


def test_nf4_round_trip_of_exact_level_times_absmax() -> None:
    torch.manual_seed(2)
    idx = torch.randint(0, 16, (32, 64))
    idx[:, 0] = torch.randint(0, 2, (32,)) * 15  # every block reaches -1 or +1: absmax = a
    a = torch.rand(32, 1) * 3 + 0.01
    x = (nf4_levels()[idx] * a).reshape(8, 256)
    qt = quantize_codebook(x, NF4_NODQ)
    assert torch.equal(qt.codes.long(), idx)
    assert torch.equal(dequantize_codebook(qt), x)


@pytest.mark.parametrize("spec", [NF4_NODQ, preset("NF4"), preset("BINARY"), preset("TERNARY")])
def test_all_zero_blocks_give_zeros_not_nan(spec: QuantSpec) -> None:
    x = torch.randn(4, 256)
    x[1] = 0
    x[2, :64] = 0
    y = dequantize_codebook(quantize_codebook(x, spec))
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all()
    if spec.fmt == "nf4" and spec.double_quant is None:
        assert (y[2, :64] == 0).all()


# ------------------------------------------------------------------------------------------ storage / DQ
def test_storage_bits_from_actual_tensors() -> None:
    x = torch.randn(256, 1024)
    qt = quantize_codebook(x, preset("NF4"))
    assert qt.codes.dtype == torch.uint8 and qt.codes.numel() == x.numel()
    assert qt.scales is None and qt.dq is not None
    assert qt.dq.codes.dtype == torch.int8 and qt.dq.codes.numel() == 4096
    assert qt.dq.steps.dtype == torch.float32 and qt.dq.steps.numel() == 16
    bits = storage_bits_per_weight(qt)
    # 4 + 8/64 + 32/(64*256) + one fp32 mean offset over 262144 weights = 4.1270751953125
    assert bits == 4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel()
    assert round(bits, 3) == 4.127
    qt1 = quantize_codebook(x, NF4_NODQ)
    assert qt1.scales is not None and qt1.scales.dtype == torch.float32 and qt1.scales.numel() == 4096
    assert storage_bits_per_weight(qt1) == 4.5
    assert storage_bits_per_weight(quantize_codebook(x, preset("BINARY"))) == 1 + 32 / 1024
    assert storage_bits_per_weight(quantize_codebook(x, cb("kmeans", 2))) == 2 + 4 * 32 / 1024
    assert storage_bits_per_weight(quantize_codebook(x, cb("log", 4))) == 4 + 8 / 1024
    assert storage_bits_per_weight(quantize_codebook(x, cb("bcq", 3))) == 3 + 3 * 32 / 1024
    half = quantize_codebook(x, cb("kmeans", 2, scale_dtype="float16"))
    assert half.codebook.dtype == torch.float16 and storage_bits_per_weight(half) == 2 + 4 * 16 / 1024
    lut = half.codebook.float()
    assert torch.equal(half.codes.long(), brute_nearest(x, lut))  # codes re-picked for the fp16 LUT
    bq = quantize_codebook(x[:8], cb("bcq", 2, scale_dtype="bfloat16"))
    assert bq.codebook.dtype == torch.bfloat16 and storage_bits_per_weight(bq) == 2 + 2 * 16 / 1024


def test_double_quant_error_close_to_single_level() -> None:
    torch.manual_seed(3)
    x = torch.randn(256, 1024)
    e1 = rel_mse(dequantize_codebook(quantize_codebook(x, NF4_NODQ)), x)
    e2 = rel_mse(dequantize_codebook(quantize_codebook(x, preset("NF4"))), x)
    assert 0.007 < e1 < 0.0095  # measured 8.476e-3
    assert abs(e2 - e1) < 0.01 * e1  # measured e2 = 8.475e-3, |e2 - e1| / e1 = 2.1e-4
    s = x.reshape(-1, 64).abs().amax(dim=1)
    dq = double_quantize(s, 8, 256)
    assert (dq.dequantize() - s).abs().max() < 0.005 * s.max()  # measured 1.8e-3 * max
    assert torch.allclose(dq.offset, s.mean().reshape(1))


def test_double_quant_uneven_second_level_block() -> None:
    torch.manual_seed(15)
    s = torch.rand(300) + 1
    dq = double_quantize(s, 8, 256)
    assert dq.codes.numel() == 300 and dq.steps.numel() == 2
    assert (dq.dequantize() - s).abs().max() < 0.01  # measured <= 2.1e-3 (step/2 = max|s - mean| / 254)


# ------------------------------------------------------------------------------------------ k-means
def naive_wquantile_init(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    vals, order = x.sort()
    cum = w[order].cumsum(0)
    out = []
    for j in range(k):
        target = (j + 0.5) / k * cum[-1]
        i = next((i for i in range(x.numel()) if cum[i] >= target), x.numel() - 1)
        out.append(vals[i])
    return torch.stack(out)


def naive_lloyd(x: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        codes = brute_nearest(x[None], lut)[0]
        new = lut.clone()
        for j in range(lut.numel()):
            m = codes == j
            if w[m].sum() > 0:
                new[j] = (w[m] * x[m]).sum() / w[m].sum()
        new = new.sort().values
        if torch.equal(new, lut):
            break
        lut = new
    return lut


def naive_kmeans_row(x: torch.Tensor, k: int, w: torch.Tensor | None, iters: int) -> torch.Tensor:
    ones = torch.ones_like(x)
    ww = ones if w is None else w
    lut = naive_lloyd(x, ww, naive_wquantile_init(x, ww, k), iters)
    if w is not None:  # warm start from the unweighted solution, keep the better one
        warm = naive_lloyd(x, w, naive_lloyd(x, ones, naive_wquantile_init(x, ones, k), iters), iters)

        def err(lv: torch.Tensor) -> float:
            return float(((lv[brute_nearest(x[None], lv)[0]] - x).square() * w).sum())

        lut = warm if err(warm) < err(lut) else lut
    return lut


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_matches_naive_per_row(weighted: bool) -> None:
    torch.manual_seed(4)
    x = torch.randn(5, 96)
    w = torch.rand(5, 96) ** 2 * 10
    codes, lut = kmeans_rows(x, 8, w if weighted else None, iters=15)
    assert codes.dtype == torch.uint8 and lut.shape == (5, 8)
    for r in range(5):
        ref = naive_kmeans_row(x[r], 8, w[r] if weighted else None, 15)
        assert torch.allclose(lut[r], ref, atol=1e-5)  # measured max diff 3.6e-7 (summation order)
        assert torch.equal(codes[r].long(), brute_nearest(x[r : r + 1], ref)[0])


def test_weighted_kmeans_lowers_weighted_error() -> None:
    torch.manual_seed(5)
    x = torch.randn(16, 128)
    h = torch.rand(128) ** 4 * 100  # Hessian-diagonal-like importance per column
    spec = cb("kmeans", 3)
    yu = dequantize_codebook(quantize_codebook(x, spec))
    yw = dequantize_codebook(quantize_codebook(x, spec, weights=h))
    eu_rows = ((yu - x).square() * h).sum(dim=1)
    ew_rows = ((yw - x).square() * h).sum(dim=1)
    assert (ew_rows <= eu_rows * (1 + 1e-6)).all()  # guaranteed by the warm start
    assert float(ew_rows.sum()) < 0.85 * float(eu_rows.sum())  # measured ew / eu = 0.753
    assert rel_mse(yu, x) < rel_mse(yw, x)  # plain MSE favours the unweighted fit (measured 0.031 vs 0.036)


def test_kmeans_lloyd_lowers_error_vs_init() -> None:
    torch.manual_seed(6)
    x = torch.randn(8, 256)
    c0, l0 = kmeans_rows(x, 4, iters=0)
    c1, l1 = kmeans_rows(x, 4, iters=20)
    e0 = rel_mse(l0.gather(1, c0.long()), x)
    e1 = rel_mse(l1.gather(1, c1.long()), x)
    assert e1 < 0.9 * e0  # measured e1 / e0 = 0.79 (quantile init 0.141 -> 0.111)


# ------------------------------------------------------------------------------------------ log
def test_log_levels_are_signed_powers_of_two_plus_zero() -> None:
    for bits in range(2, 9):
        lv = log_levels(bits)
        assert lv.numel() == 2**bits - 1 and (lv == 0).sum() == 1
        nz = lv[lv != 0].abs()
        assert torch.equal(torch.exp2(torch.log2(nz).round()), nz) and nz.max() == 1
    assert torch.equal(log_levels(1), torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_log_matches_naive_per_row(bits: int) -> None:
    torch.manual_seed(7)
    x = torch.randn(6, 40) * torch.rand(6, 1) * 10
    qt = quantize_codebook(x, cb("log", bits))
    y = dequantize_codebook(qt)
    lv = log_levels(bits).double()
    for r in range(6):
        row = x[r].double()
        top = math.floor(math.log2(float(row.abs().max())))
        errs = []
        for e in range(top - 2, top + 2):  # the four max exponents, brute-force nearest level
            cand = lv[(row[:, None] - lv * 2.0**e).abs().argmin(dim=1)] * 2.0**e
            errs.append(float((cand - row).square().sum()))
        got = float((y[r].double() - row).square().sum())
        assert abs(got - min(errs)) <= 1e-6 * min(errs)  # measured rel. diff 0.0 for bits 1, 3, 4
        if bits >= 3:  # no exponent outside the window does better
            for e in range(top - 12, top + 6):
                cand = lv[(row[:, None] - lv * 2.0**e).abs().argmin(dim=1)] * 2.0**e
                assert float((cand - row).square().sum()) >= got * (1 - 1e-6)
    codes, e = log_rows(x, bits)
    assert e.dtype == torch.int8 and int(codes.max()) < lv.numel()


# ------------------------------------------------------------------------------------------ binary / ternary
def test_binary_matches_naive_and_alpha_is_optimal() -> None:
    torch.manual_seed(8)
    x = torch.randn(5, 33)
    x[0, 0] = 0.0  # sign(0) -> +1
    y = dequantize_codebook(quantize_codebook(x, preset("BINARY")))
    for r in range(5):
        alpha = x[r].abs().mean()
        ref = torch.where(x[r] >= 0, alpha, -alpha)
        assert torch.allclose(y[r], ref, atol=0, rtol=1e-6)  # measured max diff 0.0 (same fp32 mean)
        for f in (0.9, 1.1):  # any other alpha is worse
            assert (x[r] - f * ref).square().sum() > (x[r] - ref).square().sum()
    assert y[0, 0] > 0


def test_ternary_matches_naive_twn() -> None:
    torch.manual_seed(9)
    x = torch.randn(5, 50)
    qt = quantize_codebook(x, preset("TERNARY"))
    y = dequantize_codebook(qt)
    assert set(qt.codes.unique().tolist()) <= {0, 1, 2}
    for r in range(5):
        a = x[r].abs()
        delta = 0.7 * a.mean()
        keep = a > delta
        alpha = a[keep].mean()
        ref = torch.where(keep, torch.sign(x[r]) * alpha, torch.zeros_like(a))
        assert torch.allclose(y[r], ref, atol=1e-6)  # measured max diff 1.2e-7 (sum order)


# ------------------------------------------------------------------------------------------ BCQ
def test_bcq_greedy_matches_naive() -> None:
    torch.manual_seed(10)
    x = torch.randn(4, 32)
    codes, alphas = bcq_greedy(x, 3)
    for r in range(4):
        res, recon = x[r].clone(), torch.zeros(32)
        for i in range(3):
            b = torch.where(res >= 0, 1.0, -1.0)
            a = res.abs().mean()
            assert torch.allclose(alphas[r, i], a)
            assert torch.equal((codes[r] >> i) & 1, (b > 0).long())
            recon += a * b
            res -= a * b


@pytest.mark.parametrize("q", [2, 3, 4])
def test_bcq_error_non_increasing_and_below_greedy(q: int) -> None:
    torch.manual_seed(11)
    x = torch.randn(32, 128)
    codes, alphas, hist = bcq_fit(x, q, iters=8)
    steps = [b / a - 1 for a, b in zip(hist, hist[1:])]
    assert max(steps) <= 1e-6  # measured max relative step -6.7e-4 (q=2), -1.7e-2 (3), -4.0e-2 (4)
    assert hist[-1] < 0.95 * hist[0]  # measured 0.90 (q=2), 0.65 (3), 0.38 (4) of greedy
    # the final codes are the brute-force best of the 2^q combinations for the final alphas
    signs = torch.tensor([[1.0 if (c >> i) & 1 else -1.0 for i in range(q)] for c in range(2**q)])
    table = alphas @ signs.T
    assert torch.equal(table.gather(1, codes.long()), table.gather(1, brute_nearest(x, table)))
    err = float((table.gather(1, codes.long()) - x).square().sum())
    assert abs(err - hist[-1]) <= 1e-6 * err  # measured 0.0


def test_bcq_planes_and_one_bit_equals_binary() -> None:
    torch.manual_seed(12)
    x = torch.randn(8, 64)
    qt = quantize_codebook(x, cb("bcq", 3))
    planes = bcq_planes(qt)
    assert planes.shape == (3, 8, 64) and set(planes.unique().tolist()) == {-1, 1}
    recon = (qt.codebook.T[:, :, None] * planes.float()).sum(dim=0)
    assert torch.allclose(recon, dequantize_codebook(qt), atol=1e-6)  # measured 0.0
    y1 = dequantize_codebook(quantize_codebook(x, cb("bcq", 1)))
    yb = dequantize_codebook(quantize_codebook(x, preset("BINARY")))
    assert torch.allclose(y1, yb, atol=1e-6)  # 1-plane LS alpha = mean|x|; measured 6e-8


def test_weighted_bcq_lowers_weighted_error() -> None:
    torch.manual_seed(13)
    x = torch.randn(16, 128)
    h = torch.where(torch.rand(128) < 0.1, 100.0, 1.0)  # 10% of columns 100x as important
    spec = cb("bcq", 2)
    eu = float(((dequantize_codebook(quantize_codebook(x, spec)) - x).square() * h).sum())
    ew = float(((dequantize_codebook(quantize_codebook(x, spec, weights=h)) - x).square() * h).sum())
    assert ew < 0.95 * eu  # measured ew / eu = 0.85


# ------------------------------------------------------------------------------------------ dispatch
# (spec, relative-MSE bound); bound = ~1.5x the worst measured over 648 random cases per spec
SPECS = [
    (NF4_NODQ, 0.015),  # measured worst 0.0094
    (preset("NF4"), 0.015),  # 0.0094
    (preset("BINARY"), 0.6),  # 0.427
    (preset("TERNARY"), 0.35),  # 0.234
    (cb("kmeans", 3, "group", group_size=16), 0.03),  # 0.0198
    (cb("log", 4, "group", group_size=16), 0.07),  # 0.0451
    (cb("bcq", 2, "group", group_size=16), 0.18),  # 0.119
    (cb("kmeans", 2, "block", block=(2, 8)), 0.15),  # 0.096
    (cb("ternary", 2, "tensor"), 0.35),  # 0.234
]
N_LEVELS = {"nf4": 16, "binary": 2, "ternary": 3, "kmeans": 8, "log": 15, "bcq": 4}  # upper bounds


@settings(max_examples=50, deadline=None)
@given(
    spec_i=st.integers(0, len(SPECS) - 1),
    rows=st.integers(1, 6),
    col_groups=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_round_trip_properties(
    spec_i: int, rows: int, col_groups: int, dtype: torch.dtype, seed: int, scale: float
) -> None:
    spec, bound = SPECS[spec_i]
    cols = 64 * col_groups
    if spec.granularity == "block":
        rows = 2 * rows
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    qt = quantize_codebook(x, spec, iters=5)
    y = dequantize_codebook(qt)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) < N_LEVELS[spec.fmt]
    assert rel_mse(y, x) < bound
    if spec.fmt == "nf4" and spec.double_quant is None:
        xg = x.float().reshape(-1, 64)
        gap = float(nf4_levels().diff().max()) / 2  # widest half-gap: (1 - 0.6961928) / 2 = 0.152
        bound_e = xg.abs().amax(dim=1, keepdim=True) * gap * (1 + 1e-6)
        assert ((y.float().reshape(-1, 64) - xg).abs() <= bound_e + 1e-2 * xg.abs()).all()  # + output rounding


def test_padding_ignores_fill_in_means() -> None:
    torch.manual_seed(14)
    x = torch.randn(3, 40)
    spec = cb("binary", 1, "group", group_size=16, padding="pad")
    qt = quantize_codebook(x, spec)
    y = dequantize_codebook(qt)
    assert y.shape == x.shape and qt.codes.shape == (9, 16)
    last = x[:, 32:]
    assert torch.allclose(y[:, 32:].abs(), last.abs().mean(dim=1, keepdim=True).expand(3, 8))
    # block tiles (2, 8) on a 3 x 12 tensor: fill rows and columns must not count in the mean
    xb = torch.randn(3, 12)
    yb = dequantize_codebook(quantize_codebook(xb, cb("binary", 1, "block", block=(2, 8), padding="pad")))
    for r0, c0 in [(0, 0), (0, 8), (2, 0), (2, 8)]:
        tile = xb[r0 : r0 + 2, c0 : c0 + 8]
        assert torch.allclose(yb[r0 : r0 + 2, c0 : c0 + 8].abs(), tile.abs().mean().expand_as(tile))
    yk = dequantize_codebook(quantize_codebook(x, cb("kmeans", 2, "group", group_size=16, padding="pad")))
    assert yk.shape == x.shape
    yn = dequantize_codebook(quantize_codebook(x, NF4_NODQ.replace(padding="pad")))
    assert yn.shape == x.shape and rel_mse(yn, x) < 0.02  # measured 9.0e-3


def test_fake_quant_straight_through_gradient() -> None:
    x = torch.randn(4, 128, requires_grad=True)
    for spec in (preset("NF4"), preset("TERNARY"), cb("kmeans", 2), cb("bcq", 2)):
        y = fake_quant_codebook(x, spec)
        assert torch.equal(y.detach(), dequantize_codebook(quantize_codebook(x.detach(), spec)))
        (g,) = torch.autograd.grad((y * 3).sum(), x)
        assert torch.equal(g, torch.full_like(x, 3.0))


def test_spec_errors_are_clear() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="codebook"):
        quantize_codebook(x, preset("W8"))
    with pytest.raises(ValueError, match="double_quant"):
        quantize_codebook(x, cb("kmeans", 2, double_quant=(8, 256)))
    with pytest.raises(ValueError, match="weights"):
        quantize_codebook(x, NF4_NODQ, weights=torch.ones(64))
    with pytest.raises(ValueError, match="broadcast"):
        quantize_codebook(x, cb("kmeans", 2), weights=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_codebook(x, cb("kmeans", 2), weights=-torch.ones(64))
    with pytest.raises(ValueError, match="e8m0/e4m3 scales do not apply"):  # rejected by QuantSpec
        quantize_codebook(x, cb("kmeans", 2, scale_dtype="e8m0"))
    with pytest.raises(ValueError, match="group_size"):
        quantize_codebook(torch.randn(4, 60), NF4_NODQ)
    assert math.isfinite(storage_bits_per_weight(quantize_codebook(x, cb("log", 2))))
