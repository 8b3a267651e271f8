"""Tests for lowbit.core.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.core.metrics import cosine_similarity, error_report, max_abs_error, mse, sqnr_db

KEYS = {"mse", "sqnr_db", "cosine_similarity", "max_abs_error"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_hand_computed_example(dtype):
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    approx = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=dtype)  # all values exact in every dtype
    rep = error_report(ref, approx)
    assert set(rep) == KEYS and all(type(v) is float for v in rep.values())
    assert rep["mse"] == 1.0  # (6 - 4)^2 / 4
    assert rep["max_abs_error"] == 2.0
    # 10*log10(30 / 4) = 8.750612633917...; measured |diff| 0.0 (fp64 throughout)
    assert rep["sqnr_db"] == pytest.approx(10 * math.log10(30 / 4), abs=1e-12)
    # 38 / sqrt(30 * 50) = 0.98115578103921...; measured |diff| 0.0
    assert rep["cosine_similarity"] == pytest.approx(38 / math.sqrt(1500), abs=1e-12)


def test_known_sqnr_of_relative_noise():
    # approx = ref * (1 + 2^-7): noise power / signal power = 2^-14 -> 140*log10(2) = 42.144 dB
    ref = torch.tensor([3.0, 4.0])
    approx = ref * (1 + 1 / 128)  # exactly representable in fp32
    assert sqnr_db(ref, approx) == pytest.approx(140 * math.log10(2), abs=1e-9)  # measured diff 0.0
    assert cosine_similarity(ref, approx) == pytest.approx(1.0, abs=1e-12)  # parallel; measured 1.0 exactly


def test_uniform_quantization_sqnr_is_6db_per_bit():
    # a full-scale ramp on [-1, 1] rounded to a 256-level grid: SQNR ~ 20*log10(256) = 48.165 dB
    x = torch.linspace(-1, 1, 100_001, dtype=torch.float64)
    step = 2 / 256
    q = torch.round(x / step) * step
    # measured |diff| 1.3e-4 dB (noise is only approximately uniform on a finite ramp)
    assert sqnr_db(x, q) == pytest.approx(20 * math.log10(256), abs=1e-3)


def test_orthogonal_and_opposite():
    rep = error_report(torch.tensor([3, 4]), torch.tensor([-4, 3]))  # integer inputs are fine
    assert rep["cosine_similarity"] == 0.0  # dot = -12 + 12 = 0 exactly
    assert rep["mse"] == 25.0  # (49 + 1) / 2
    assert rep["max_abs_error"] == 7.0
    assert rep["sqnr_db"] == pytest.approx(10 * math.log10(25 / 50), abs=1e-12)  # -3.0103; measured diff 0.0
    x = torch.tensor([0.5, -2.0, 1.5])
    assert cosine_similarity(x, -x) == -1.0  # clamped; measured -1.0 exactly


def test_low_precision_inputs_are_upcast():
    # in fp16 the difference 120000 overflows (max 65504); computed in fp64 it is exact
    ref = torch.tensor([60000.0], dtype=torch.float16)
    rep = error_report(ref, -ref)
    assert rep["max_abs_error"] == 120000.0
    assert rep["mse"] == 120000.0**2
    assert rep["sqnr_db"] == pytest.approx(10 * math.log10(1 / 4), abs=1e-12)  # measured diff 0.0


def test_exact_and_zero_cases():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    rep = error_report(x, x.clone())
    assert rep == {"mse": 0.0, "sqnr_db": math.inf, "cosine_similarity": pytest.approx(1.0, abs=1e-12),
                   "max_abs_error": 0.0}  # cosine measured |1 - cos| = 0.0
    z = torch.zeros(4)
    assert sqnr_db(z, z) == math.inf
    assert sqnr_db(z, torch.ones(4)) == -math.inf
    assert cosine_similarity(z, z) == 1.0
    assert cosine_similarity(z, torch.ones(4)) == 0.0


def test_nan_propagates():
    ref = torch.tensor([1.0, float("nan")])
    assert math.isnan(cosine_similarity(ref, torch.ones(2)))
    assert math.isnan(mse(ref, torch.ones(2)))


def test_flattened_over_any_shape():
    ref = torch.arange(12.0).reshape(3, 4)
    approx = ref + 0.5
    assert mse(ref, approx) == 0.25
    assert max_abs_error(ref, approx) == 0.5


@pytest.mark.parametrize("fn", [mse, sqnr_db, cosine_similarity, max_abs_error, error_report])
def test_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fn(torch.zeros(2, 3), torch.zeros(3, 2))


def test_empty_rejected():
    with pytest.raises(ValueError, match="empty"):
        mse(torch.zeros(0), torch.zeros(0))
