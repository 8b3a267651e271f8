"""lowbit.analysis.stats against naive pure-Python references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lowbit.analysis import stats


def _naive_excess_kurtosis(xs: list[float]) -> float:
    n = len(xs)
    mu = sum(xs) / n
    m2 = sum((x - mu) ** 2 for x in xs) / n
    m4 = sum((x - mu) ** 4 for x in xs) / n
    return m4 / m2**2 - 3.0


def test_kurtosis_matches_naive_and_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g, dtype=torch.float64)
    xs = x.tolist()
    assert stats.kurtosis(x) == pytest.approx(_naive_excess_kurtosis(xs), rel=1e-12)  # measured 4.6e-13
    # two-point distribution +-1: m4 / m2^2 = 1, excess -2 exactly
    assert stats.kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0])) == pytest.approx(-2.0, abs=1e-12)  # measured 0
    # uniform on a fine grid: excess kurtosis -6/5 (measured -1.20000007 with 10001 points)
    assert stats.kurtosis(torch.linspace(-1, 1, 10001)) == pytest.approx(-1.2, abs=1e-6)
    assert stats.kurtosis(torch.full((5,), 3.0)) == 0.0


def test_median_even_and_odd():
    assert stats.median(torch.tensor([3.0, 1.0, 2.0])) == 2.0
    assert stats.median(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.5  # mean of the middle pair, as statistics.median


def test_update_absmax_is_running_max_over_tokens():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]
    acc = None
    for b in batches:
        acc = stats.update_absmax(acc, b)
    naive = [max(abs(float(b[i, t, c])) for b in batches for i in range(2) for t in range(5)) for c in range(7)]
    assert acc.tolist() == pytest.approx(naive, abs=0)


def test_outlier_channels_and_channel_stats_vs_naive():
    absmax = torch.tensor([1.0, 1.2, 0.9, 50.0, 1.1, 7.0, 1.0, 6.5, 0.8, 20.0])
    vals = absmax.tolist()
    med = statistics.median(vals)  # 1.15: 6.5 is below 6 x 1.15, 7.0 above
    naive = sorted((i for i, v in enumerate(vals) if v > 6 * med), key=lambda i: -vals[i])
    assert stats.outlier_channels(absmax) == naive == [3, 9, 5]
    assert stats.outlier_channels(absmax, factor=10.0) == [3, 9]
    assert stats.outlier_channels(absmax, top_k=3) == [3, 9, 5]
    s = stats.channel_stats(absmax)
    assert s["channels"] == 10
    assert s["max"] == 50.0
    # float32 input, float64 math on both sides: measured differences 0
    assert s["median"] == pytest.approx(med, abs=1e-7)
    assert s["ratio"] == pytest.approx(50.0 / med, rel=1e-7)
    assert s["kurtosis"] == pytest.approx(_naive_excess_kurtosis(vals), rel=1e-7)
    assert s["outliers"] == naive
    assert s["top"][:4] == [3, 9, 5, 7]


def test_channel_stats_without_outliers():
    s = stats.channel_stats(torch.ones(16))
    assert s["ratio"] == 1.0 and s["outliers"] == [] and s["kurtosis"] == 0.0


def test_weight_summary_vs_naive():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 40, generator=g)
    w[3, 7] = 9.0  # one heavy weight
    vals = w.double().flatten().tolist()
    n = len(vals)
    mu = sum(vals) / n
    std = math.sqrt(sum((v - mu) ** 2 for v in vals) / n)
    rows = [max(abs(v) for v in w[i].double().tolist()) for i in range(12)]
    rmean = sum(rows) / 12
    s = stats.weight_summary(w)
    # measured relative differences: std 2e-16, absmax/std 2e-16, kurtosis 3e-15, row statistics 0
    assert s["std"] == pytest.approx(std, rel=1e-12)
    assert s["absmax"] == pytest.approx(9.0)
    assert s["absmax_over_std"] == pytest.approx(9.0 / std, rel=1e-12)
    assert s["kurtosis"] == pytest.approx(_naive_excess_kurtosis(vals), rel=1e-10)
    assert s["beyond_3sigma"] == sum(abs(v - mu) > 3 * std for v in vals) / n
    assert s["row_absmax_max_over_median"] == pytest.approx(max(rows) / statistics.median(rows), rel=1e-12)
    assert s["row_absmax_min_over_median"] == pytest.approx(min(rows) / statistics.median(rows), rel=1e-12)
    assert s["row_absmax_cv"] == pytest.approx(statistics.pstdev(rows) / rmean, rel=1e-10)
    with pytest.raises(ValueError, match="2-D"):
        stats.weight_summary(torch.ones(3))


def test_gaussian_weights_look_gaussian():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(3))
    s = stats.weight_summary(w)
    assert abs(s["kurtosis"]) < 0.05  # measured 0.0086 (sampling sd ~ 0.01 for 262144 values)
    assert s["beyond_3sigma"] == pytest.approx(0.0027, abs=4e-4)  # measured 0.00278 (sampling sd ~ 1e-4)


def test_hidden_error_vs_naive_and_batched_merge():
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(3, 5, 8, generator=g)
    approx = ref + 0.1 * torch.randn(3, 5, 8, generator=g)
    r, a = ref.reshape(-1, 8).double(), approx.reshape(-1, 8).double()
    rel = math.sqrt(float(((r - a) ** 2).sum()) / float((r**2).sum()))
    cosines = [float(r[i] @ a[i]) / (float(r[i].norm()) * float(a[i].norm())) for i in range(15)]
    tok_rel = [float((r[i] - a[i]).norm()) / float(r[i].norm()) for i in range(15)]
    e = stats.hidden_error(ref, approx)
    # measured relative differences: 0, 0, 1.1e-16, 0 (merged batches: 1.4e-16)
    assert e["rel_error"] == pytest.approx(rel, rel=1e-12)
    assert e["token_rel_error"] == pytest.approx(sum(tok_rel) / 15, rel=1e-12)
    assert e["cosine"] == pytest.approx(sum(cosines) / 15, rel=1e-12)
    assert e["cosine_min"] == pytest.approx(min(cosines), rel=1e-12)
    merged = stats.finish_hidden_error(stats.merge_error_terms(
        stats.hidden_error_terms(ref[i : i + 1], approx[i : i + 1]) for i in range(3)))
    assert merged == pytest.approx(e, rel=1e-12)


def test_hidden_error_identical_and_zero_tokens():
    x = torch.randn(2, 4, 6)
    assert stats.hidden_error(x, x.clone()) == pytest.approx(
        {"rel_error": 0.0, "token_rel_error": 0.0, "cosine": 1.0, "cosine_min": 1.0})
    z = torch.zeros(1, 2, 3)
    assert stats.hidden_error(z, z) == {"rel_error": 0.0, "token_rel_error": 0.0, "cosine": 1.0, "cosine_min": 1.0}
    with pytest.raises(ValueError, match="shape mismatch"):
        stats.hidden_error(x, x[:1])


def test_token_relative_error_is_not_dominated_by_one_large_token():
    ref = torch.ones(1, 4, 2)
    ref[0, 0] *= 1000.0  # a "massive activation" token
    approx = ref.clone()
    approx[0, 1:] *= 1.1  # 10% error on every small token, none on the large one
    e = stats.hidden_error(ref, approx)
    assert e["rel_error"] < 1e-3  # Frobenius: 0.1 * sqrt(3 * 2) / sqrt(2e6 + 6) = 1.7e-4
    assert e["token_rel_error"] == pytest.approx(0.075)  # (0 + 3 * 0.1) / 4


def test_summarize_activations_counts_recurring_channels():
    layers = {
        "b.0.q_proj": {"type": "q_proj", "ratio": 10.0, "kurtosis": 5.0, "outliers": [7, 3]},
        "b.1.q_proj": {"type": "q_proj", "ratio": 30.0, "kurtosis": 9.0, "outliers": [7]},
        "b.0.down_proj": {"type": "down_proj", "ratio": 2.0, "kurtosis": 1.0, "outliers": []},
    }
    s = stats.summarize_activations(layers)
    assert s["q_proj"] == {"layers": 2, "mean_ratio": 20.0, "max_ratio": 30.0, "mean_kurtosis": 7.0,
                           "mean_outliers": 1.5, "recurring_outliers": [[7, 2], [3, 1]]}
    assert s["down_proj"]["recurring_outliers"] == []


def test_weight_summary_leaves_its_input_alone():
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    before = w.clone()
    stats.weight_summary(w)
    assert torch.equal(w, before)


def test_absmax_encoding_round_trips_at_4_significant_digits():
    a = torch.tensor([0.0, 1.0, 123456.0, 3.14159265, 1e-7, 0.012345678])
    text = stats.encode_absmax(a)
    assert text == "0 1 1.235e+05 3.142 1e-07 0.01235"
    assert stats.absmax_values({"absmax": text}) == [0.0, 1.0, 123500.0, 3.142, 1e-7, 0.01235]
    assert stats.absmax_values({"absmax": [1, 2.5]}) == [1.0, 2.5]
