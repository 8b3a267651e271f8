"""Kernel choice: a short probe per regime on small random inputs, cached per layer signature; the
chunked dequantize + GEMM kernel; row-at-a-time kernels (tinygemm int4, int8pack) never run prefill.
The probe tests switch lowbit's native kernels off (``no_native``): where they apply, decode takes
them by rule (tests/packed/test_native.py)."""

from __future__ import annotations

import pytest
import torch

from lowbit.packed import QuantLinear
from lowbit.packed import kernels


@pytest.fixture(autouse=True)
def _fresh_choices():
    kernels.clear_choices()
    yield
    kernels.clear_choices()


@pytest.fixture()
def timer(monkeypatch):
    """Replace the timer: records the token count of every timed input; ``fast`` names the kernel
    (closure name) that reports 0 s, every other kernel 1 s."""
    calls: list[int] = []
    state = {"fast": None}

    def fake(fn, x, repeats=5):
        calls.append(x.shape[0])
        return 0.0 if fn.__name__ == state["fast"] else 1.0
    monkeypatch.setattr(kernels, "time_call", fake)
    return calls, state


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", ["group", "channel", "g_idx"])
def test_fast_dequantize_is_bit_identical(bits, symmetric, layout, random_int_weight):
    w = random_int_weight(bits, 24, 128, None if layout == "channel" else 32, symmetric,
                          g_idx=layout == "g_idx")
    q = QuantLinear(w)
    assert torch.equal(kernels.unpack_codes(q.weight_packed, bits, w.shape), w.codes)
    assert torch.equal(q.dequantized_weight(), w.dequantize())  # (q - zero) * scale, the same fp32 rounding


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g_idx", [False, True])
def test_chunked_dequant_matmul_agrees_with_reference(symmetric, g_idx, random_int_weight):
    w = random_int_weight(4, 64, 128, 32, symmetric, g_idx=g_idx)
    q = QuantLinear(w, bias=torch.randn(64))
    x = torch.randn(3, 7, 128)
    ref = q.reference_forward(x)
    for chunk in (128 * 10, 128 * 64, 1):  # 10-row chunks (the last one 4 rows), one chunk, one row at a time
        y = kernels.dequant_matmul(x, q.weight_packed, q.weight_scale, q.weight_zero_point, q.group_size,
                                   q.weight_g_idx, q.bits, (64, 128), q.dtype, q.bias, chunk_elements=chunk)
        assert y.shape == ref.shape
        assert ((y - ref).norm() / ref.norm()).item() < 1e-6, chunk  # measured 0.0: same dot products


def test_row_kernels_only_decode_and_probe_is_small(timer, random_int_weight, no_native):
    calls, state = timer
    state["fast"] = "int4"  # the tinygemm kernel "wins" every timing it enters
    q = QuantLinear(random_int_weight(4, 64, 128, 64), bias=torch.randn(64))
    x = torch.randn(1, 300, 128)
    ref = q.reference_forward(x)
    with torch.no_grad():
        y = q(x)  # first call: picks the kernels
    assert q.kernel == {"decode": "int4pack", "prefill": "dequant"}
    assert set(q.timings["decode"]) == {"dequant", "int4pack"}
    assert q.timings["prefill"] == {}  # one candidate: taken untimed
    assert calls and set(calls) == {1}  # only the 1-token decode probe was timed, never the 300-token input
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(q(x[:, :1]), ref[:, :1], rtol=1e-5, atol=1e-5)  # decode: int4pack
        assert torch.allclose(q(x[0, ::150]), ref[0, ::150], rtol=1e-5, atol=1e-5)  # 2 strided rows


def test_int8_row_kernel_is_decode_only(timer, random_int_weight, no_native):
    calls, state = timer
    state["fast"] = "int8"
    q = QuantLinear(random_int_weight(8, 32, 64, None))
    assert q.select_kernel() == {"decode": "int8pack", "prefill": "dequant"}
    assert set(calls) == {1}
    packed = q.weight_packed.numel() * 4 + q.weight_scale.numel() * 4
    assert q.weight_bytes() == packed + 32 * 64  # the int8 codes int8pack keeps are counted
    state["fast"] = "dequant"
    q.select_kernel(force=True)
    assert q._w8 is None and q.weight_bytes() == packed  # and released when it is not chosen


def test_choice_is_probed_once_per_signature(timer, random_int_weight, no_native):
    calls, state = timer
    state["fast"] = "dequant"
    a = QuantLinear(random_int_weight(4, 64, 128, 64, seed=1))
    b = QuantLinear(random_int_weight(4, 64, 128, 64, seed=2))  # same signature, other weights
    c = QuantLinear(random_int_weight(4, 128, 128, 64, seed=3))  # another shape
    a.select_kernel()
    probed = len(calls)
    assert probed > 0 and a.kernel == {"decode": "dequant", "prefill": "dequant"}
    assert a._int4 is None  # the tinygemm copy is dropped when no regime uses it
    b.select_kernel()
    assert len(calls) == probed and b.kernel == a.kernel and b.timings == a.timings  # from the cache
    assert b._int4 is None  # a cached "dequant" never builds the tinygemm layout
    c.select_kernel()
    assert len(calls) == 2 * probed  # a new shape probes again
    b.select_kernel(force=True)
    assert len(calls) == 3 * probed  # force probes again


def test_real_probe_picks_applicable_kernels_that_agree(random_int_weight):
    q = QuantLinear(random_int_weight(4, 64, 128, 64, False), bias=torch.randn(64))
    chosen = q.select_kernel()
    assert chosen["prefill"] == "dequant" and chosen["decode"] in {"dequant", "int4pack", "native"}
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        assert torch.allclose(q(x), q.reference_forward(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(q(x[:, :1]), q.reference_forward(x[:, :1]), rtol=1e-4, atol=1e-5)
