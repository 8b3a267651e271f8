"""Tests for lowbit.core.observers: calibration of clipping ranges."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core.affine import compute_qparams, fake_quant_affine, fake_quant_int
from lowbit.core.granularity import group_view, param_shape
from lowbit.core.observers import (
    OBSERVER_CLASSES,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    divergence,
    entropy_threshold,
    make_observer,
    quantized_reference,
)
from lowbit.spec import OBSERVERS, QuantSpec

SETTINGS = settings(max_examples=40, deadline=None)


def int_spec(kind: str = "tensor", bits: int = 8, symmetric: bool = True, signed: bool = True, **kw) -> QuantSpec:
    if kind == "group":
        kw.setdefault("group_size", 4)
    if kind == "block":
        kw.setdefault("block", (2, 4))
    return QuantSpec(type="int", bits=bits, symmetric=symmetric, signed=signed, granularity=kind, **kw)


def groups_as_lists(x: torch.Tensor, spec: QuantSpec) -> list[list[float]]:
    xg, _ = group_view(x, spec.granularity, spec.group_size, spec.block, spec.padding)
    return [[float(v) for v in row] for row in xg]


def laplace(n: int, seed: int) -> torch.Tensor:
    """Seeded Laplace(0, 1) samples by inverting the CDF."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return 10 * math.log10(float((x.double() ** 2).sum() / ((x.double() - y.double()) ** 2).sum()))


kinds = st.sampled_from(["tensor", "channel", "token", "group", "block"])


# ----------------------------------------------------------------------------- min / max
@SETTINGS
@given(kinds, st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_minmax_matches_naive_and_streams(kind, seed, nbatch) -> None:
    spec = int_spec(kind, padding="pad")
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(4, 8, generator=g) * (i + 1) for i in range(nbatch)]
    obs = MinMaxObserver(spec)
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    # naive: per group, python min / max over every batch
    per_batch = [groups_as_lists(b, spec) for b in batches]
    for gi in range(len(per_batch[0])):
        vals = [v for pb in per_batch for v in pb[gi]]
        assert float(lo.reshape(-1)[gi]) == min(vals) and float(hi.reshape(-1)[gi]) == max(vals)
    # one batch of the concatenation: along columns for row-wise groups, anything for per tensor
    if kind in ("tensor", "channel", "token"):
        whole = MinMaxObserver(spec)
        whole.update(torch.cat(batches, dim=0 if kind == "tensor" else 1))
        assert torch.equal(whole.range()[0], lo) and torch.equal(whole.range()[1], hi)
    _, layout = group_view(batches[0], spec.granularity, spec.group_size, spec.block, spec.padding)
    assert lo.shape == param_shape(layout)
    s, z = obs.qparams()
    es, ez = compute_qparams(lo, hi, 8, True, True)
    assert torch.equal(s, es) and torch.equal(z, ez)


def test_minmax_per_tensor_accepts_varying_shapes_and_dtypes() -> None:
    obs = MinMaxObserver()
    obs.update(torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16))
    obs.update(torch.tensor([0.5, 3.0, -1.0], dtype=torch.float16))
    lo, hi = obs.range()
    assert lo.dtype == torch.float32 and lo.tolist() == [-2.0] and hi.tolist() == [3.0]


def test_moving_average_matches_recurrence() -> None:
    g = torch.Generator().manual_seed(3)
    spec = int_spec("channel")
    obs = MovingAverageMinMaxObserver(spec, momentum=0.25)
    batches = [torch.randn(3, 5, generator=g) for _ in range(4)]
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    for r in range(3):
        m_lo, m_hi = float(batches[0][r].min()), float(batches[0][r].max())
        for b in batches[1:]:
            m_lo += 0.25 * (float(b[r].min()) - m_lo)
            m_hi += 0.25 * (float(b[r].max()) - m_hi)
        assert math.isclose(float(lo[r, 0]), m_lo, rel_tol=1e-6)  # float32 vs float64: measured 7.7e-8
        assert math.isclose(float(hi[r, 0]), m_hi, rel_tol=1e-6)


# ----------------------------------------------------------------------------- percentile
def naive_percentile(vals: list[float], p: float) -> tuple[float, float]:
    """Nearest rank: k = ceil(p/100 * n) in exact arithmetic."""
    v = sorted(vals)
    n = len(v)
    k = min(n, max(1, math.ceil(Fraction(str(p)) / 100 * n)))
    return v[n - k], v[k - 1]


@SETTINGS
@given(kinds, st.integers(0, 2**31 - 1), st.sampled_from([99.99, 99.9, 99.0, 95.0, 90.0, 75.5, 100.0]))
def test_percentile_matches_sorted_lists(kind, seed, p) -> None:
    spec = int_spec(kind, padding="pad")
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(6, 20, generator=g) for _ in range(3)]
    obs = PercentileObserver(spec, percentile=p)
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    per_batch = [groups_as_lists(b, spec) for b in batches]
    for gi in range(len(per_batch[0])):
        elo, ehi = naive_percentile([v for pb in per_batch for v in pb[gi]], p)
        assert float(lo.reshape(-1)[gi]) == elo and float(hi.reshape(-1)[gi]) == ehi


def test_percentile_100_is_minmax_and_clips_outliers() -> None:
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 50.0
    a, b = PercentileObserver(int_spec("channel"), 100.0), MinMaxObserver(int_spec("channel"))
    a.update(x)
    b.update(x)
    assert torch.equal(a.range()[0], b.range()[0]) and torch.equal(a.range()[1], b.range()[1])
    c = PercentileObserver(int_spec("channel"), 99.0)
    c.update(x)
    assert float(c.range()[1][0, 0]) < 4.0  # 99th percentile of N(0,1): measured 2.50


def test_reservoir_keeps_a_uniform_sample() -> None:
    obs = PercentileObserver(int_spec("tensor"), percentile=100.0, max_samples=2000, seed=1)
    stream = torch.arange(100_000, dtype=torch.float32)
    for chunk in stream.split(700):
        obs.update(chunk)
    kept = obs.samples.data().reshape(-1)
    assert kept.numel() == 2000 and kept.unique().numel() == 2000
    assert bool(torch.isin(kept, stream).all())
    # a uniform sample of 0..99999 has mean 50000 +- 645 (1 sd); measured 49721
    assert abs(float(kept.mean()) - 50_000) < 3_000
    # every tenth of the stream is represented: measured counts 188..238 of 200 expected (sd 13)
    counts = torch.bincount((kept / 10_000).long(), minlength=10)
    assert int(counts.min()) > 130 and int(counts.max()) < 270
    # min / max stay exact even though the sample is partial
    assert obs.stats.get()[0].item() == 0.0 and obs.stats.get()[1].item() == 99_999.0


# ----------------------------------------------------------------------------- MSE
def naive_mse_range(vals: list[float], spec: QuantSpec, grid: list[float]) -> tuple[float, float]:
    x = torch.tensor(vals)
    lo, hi = min(vals), max(vals)
    best, best_p = math.inf, 1.0
    for p in grid:
        s, z = compute_qparams(torch.tensor(lo * p), torch.tensor(hi * p), spec.bits, spec.symmetric, spec.signed)
        err = float(((fake_quant_affine(x, s, z, spec.qmin, spec.qmax) - x) ** 2).sum())
        if err < best:
            best, best_p = err, p
    return lo * best_p, hi * best_p


@settings(max_examples=25, deadline=None)
@given(kinds, st.integers(2, 8), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_mse_matches_brute_force_and_never_loses_to_minmax(kind, bits, symmetric, signed, seed) -> None:
    spec = int_spec(kind, bits=bits, symmetric=symmetric, signed=signed, padding="pad")
    x = laplace(96, seed).reshape(6, 16) ** 3  # heavier than Laplace tails
    obs = MSEObserver(spec, steps=21)
    obs.update(x)
    lo, hi = obs.range()
    grid = torch.linspace(1.0, 0.2, 21).tolist()
    for gi, vals in enumerate(groups_as_lists(x, spec)):
        elo, ehi = naive_mse_range(vals, spec, grid)
        # same grid and formulas; measured max rel diff 5.7e-8
        assert math.isclose(float(lo.reshape(-1)[gi]), elo, rel_tol=1e-6, abs_tol=1e-30)
        assert math.isclose(float(hi.reshape(-1)[gi]), ehi, rel_tol=1e-6, abs_tol=1e-30)
    mm = MinMaxObserver(spec)
    mm.update(x)
    err_mse = ((fake_quant_int(x, spec, lo, hi) - x) ** 2).sum()
    err_mm = ((fake_quant_int(x, spec, *mm.range()) - x) ** 2).sum()
    assert float(err_mse) <= float(err_mm) * (1 + 1e-6)  # measured max ratio 1.0 (p = 1 is on the grid)


def test_mse_beats_minmax_on_outliers() -> None:
    x = laplace(4096, seed=5).reshape(8, 512)
    spec = int_spec("channel", bits=4)
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse.update(x)
    mm.update(x)
    a = sqnr_db(x, fake_quant_int(x, spec, *mse.range()))
    b = sqnr_db(x, fake_quant_int(x, spec, *mm.range()))
    assert a > b + 1.0  # measured: 15.1 dB vs 12.8 dB
    assert bool((mse.best_shrink < 1).all())


# ----------------------------------------------------------------------------- histogram / KL
def naive_entropy(hist: list[float], levels: int, start: int, metric: str) -> tuple[int, list[float]]:
    """Python-loop port of TensorRT / pytorch-quantization entropy calibration, same smoothing.

    Chunk of bin j for threshold i: digitize(j, linspace(0, i, levels + 1)) - 1 == j * levels // i.
    """
    n = len(hist)
    last = max(j for j in range(n) if hist[j] > 0)
    stop = min(n, max(start, last + 1))
    divs = []
    for i in range(start, stop + 1):
        p = hist[:i]
        p[-1] += sum(hist[i:])
        sums, cnt = [0.0] * levels, [0] * levels
        for j in range(i):
            if hist[j] > 0:
                sums[j * levels // i] += hist[j]
                cnt[j * levels // i] += 1
        q = [sums[j * levels // i] / cnt[j * levels // i] if hist[j] > 0 else 0.0 for j in range(i)]
        if sum(q) == 0:
            divs.append(math.inf)
            continue
        ps = [v if v > 0 else 1e-4 for v in p]
        qs = [v if v > 0 else 1e-4 for v in q]
        ps = [v / sum(ps) for v in ps]
        qs = [v / sum(qs) for v in qs]
        kl = lambda a, b: sum(u * math.log(u / w) for u, w in zip(a, b) if u > 0)  # noqa: E731
        if metric == "kl":
            divs.append(kl(ps, qs))
        elif metric == "symmetric_kl":
            divs.append(kl(ps, qs) + kl(qs, ps))
        else:
            m = [(u + w) / 2 for u, w in zip(ps, qs)]
            divs.append(0.5 * kl(ps, m) + 0.5 * kl(qs, m))
    best = min(range(len(divs)), key=lambda k: (divs[k], -k))  # ties -> larger threshold
    return start + best, divs


@pytest.mark.parametrize("metric", ["kl", "symmetric_kl", "js"])
def test_entropy_threshold_matches_python_loops(metric: str) -> None:
    x = laplace(20_000, seed=11).abs()
    hist = torch.histc(x, 96, 0, float(x.max())).double()
    hist[40] = 0.0  # an empty bin inside the range
    i, d = entropy_threshold(hist, levels=8, start_bin=16, metric=metric, block=7)
    ei, ed = naive_entropy(hist.tolist(), 8, 16, metric)
    assert i == ei
    assert torch.allclose(d, torch.tensor(ed, dtype=torch.float64), rtol=1e-9, atol=1e-12)  # measured max 2.0e-15


def test_quantized_reference_spreads_over_nonempty_bins() -> None:
    hist = torch.tensor([4.0, 0.0, 2.0, 6.0, 1.0, 1.0], dtype=torch.float64)
    # 2 levels over 6 bins: chunks {0,1,2} (sum 6 over 2 non-empty) and {3,4,5} (sum 8 over 3)
    q = quantized_reference(hist, 2)
    assert torch.allclose(q, torch.tensor([3.0, 0.0, 3.0, 8 / 3, 8 / 3, 8 / 3], dtype=torch.float64))
    assert math.isclose(divergence(hist, hist, "kl"), 0.0, abs_tol=1e-12)
    assert divergence(hist, q, "js") > 0


def test_histogram_regrows_by_exact_merging() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.rand(5000, generator=g) * 0.9
    b = torch.rand(5000, generator=g) * 7.0 - 3.5
    obs = HistogramObserver(metric="kl", bins=64, start_bin=8)
    obs.update(a)
    e0 = obs.edge
    obs.update(b)  # |x| is histogrammed; the edge doubles until it covers 3.5
    assert obs.edge == e0 * 4 and obs.edge >= float(b.abs().max())
    direct = torch.histc(torch.cat([a, b]).abs(), 64, 0, obs.edge).double()
    assert obs.hist.sum() == 10_000
    # merging 4 fine bins into one coarse bin is exact, except that the first batch's maximum sat
    # on the closed top edge of the fine histogram and stays in the coarse bin below that edge
    diff = obs.hist - direct
    assert int(diff.abs().sum()) <= 2  # measured: 2 (one count moved by one bin)
    assert int((diff != 0).sum()) <= 2 and float(diff.sum()) == 0.0


def test_kl_clips_heavy_tail_and_beats_minmax_at_8_bits() -> None:
    x = laplace(200_000, seed=0)
    spec = int_spec("tensor", bits=8)
    mm = MinMaxObserver(spec)
    mm.update(x)
    base = sqnr_db(x, fake_quant_int(x, spec, *mm.range()))
    amax = float(x.abs().max())
    results = {}
    for metric in ("kl", "symmetric_kl", "js"):
        obs = make_observer(metric, spec)
        for part in x.split(50_000):  # streamed in four batches
            obs.update(part)
        t = obs.compute_threshold()
        results[metric] = (t, sqnr_db(x, fake_quant_int(x, spec, *obs.range())))
        assert t < 0.9 * amax  # measured: t = 9.87 for all three metrics vs max|x| = 11.94
        assert results[metric][1] > base + 0.5  # measured: 35.6 dB (all three) vs 34.3 dB min-max
    s, z = obs.qparams()
    assert torch.allclose(s, torch.tensor([results["js"][0] / 127]), rtol=1e-6) and float(z) == 0.0


def test_histogram_all_zero_then_data() -> None:
    obs = HistogramObserver(bins=256, start_bin=16)
    obs.update(torch.zeros(100))
    assert obs.compute_threshold() == 0.0
    assert torch.equal(obs.qparams()[0], torch.ones(1))  # all-zero range -> scale 1
    obs.update(torch.linspace(-1, 1, 1001))
    assert float(obs.hist[0]) >= 100 and obs.hist.sum() == 1101
    assert 0 < obs.compute_threshold() <= 1.0


def test_histogram_asymmetric_range_clips_each_side() -> None:
    x = torch.cat([laplace(50_000, 2), torch.tensor([40.0])])
    obs = HistogramObserver(int_spec("tensor", symmetric=False, signed=False), bins=512, start_bin=32)
    obs.update(x)
    lo, hi = obs.range()
    t = obs.compute_threshold()
    assert float(lo) == max(float(x.min()), -t) and float(hi) == min(40.0, t) and t < 40.0


# ----------------------------------------------------------------------------- factory / errors
def test_factory_maps_every_spec_observer() -> None:
    assert set(OBSERVER_CLASSES) == set(OBSERVERS)
    for name in OBSERVERS:
        kw = {"bins": 256, "start_bin": 16} if name in ("kl", "symmetric_kl", "js") else {}
        obs = make_observer(QuantSpec(type="int", bits=8, granularity="tensor", observer=name), **kw)
        assert isinstance(obs, OBSERVER_CLASSES[name]) and obs.name == name
        obs.update(torch.randn(64))
        scale, zero = obs.qparams()
        assert scale.shape == (1,) and zero.shape == (1,)
    assert isinstance(make_observer("percentile", percentile=99.0), PercentileObserver)
    assert make_observer("js", bins=512).bins == 512
    assert make_observer("mse", int_spec("channel")).spec.granularity == "channel"


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="seen no data"):
        MinMaxObserver().qparams()
    with pytest.raises(ValueError, match="seen no data"):
        HistogramObserver().range()
    obs = MinMaxObserver(int_spec("channel"))
    obs.update(torch.randn(4, 8))
    with pytest.raises(ValueError, match="same shape every batch"):
        obs.update(torch.randn(4, 9))
    for bad in (0, 101, 40.0, "99"):
        with pytest.raises(ValueError, match="percentile must be"):
            PercentileObserver(percentile=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("entropy")
    with pytest.raises(ValueError, match="granularity 'tensor'"):
        make_observer(QuantSpec(type="int", bits=8, granularity="channel", observer="kl"))
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        MinMaxObserver().update(torch.tensor([1.0, float("inf")]))
    fobs = MinMaxObserver(QuantSpec(type="float", fmt="e4m3", bits=8, granularity="tensor"))
    fobs.update(torch.randn(8))
    assert fobs.range()[1].shape == (1,)
    with pytest.raises(ValueError, match="int spec"):
        fobs.qparams()
