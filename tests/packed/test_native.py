"""lowbit's native kernels (``lowbit.packed.native``) against naive references: the packed GEMV, the fp32 GEMV
and the one-pass dequantization; where layers take them; the build cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.packed import QuantLinear, kernels, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C/C++ compiler to build lowbit's native kernels")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 48, None])  # 48: not a multiple of 32, the plain-loop path
@pytest.mark.parametrize("tokens", [1, 3, 11])  # 11: a tile of 8 rows and a tile of 3
def test_qgemv_matches_dequantize_then_matmul(bits, symmetric, group, tokens, random_int_weight):
    w = random_int_weight(bits, 40, 192, group, symmetric, seed=bits + tokens)
    q = QuantLinear(w, bias=torch.randn(40))
    x = torch.randn(tokens, 192)
    ref = x.double() @ w.dequantize(torch.float64).t() + q.bias.double()
    y = native.qgemv(x, q.weight_packed, q.weight_scale, q.weight_zero_point, q.bias, bits, group or 192, 40)
    assert y.shape == (tokens, 40)
    assert _rel(y.double(), ref) < 2e-6  # measured 2.2e-7 .. 4.4e-7: fp32 sums in another order


def test_dequant_is_bit_identical_to_the_torch_expression(random_int_weight, monkeypatch):
    for bits, group, symmetric in [(4, 64, False), (4, 32, True), (8, None, True), (8, 16, False)]:
        w = random_int_weight(bits, 24, 128, group, symmetric)
        q = QuantLinear(w)
        fast = q.dequantized_weight()  # native: one pass over the packed bytes
        with monkeypatch.context() as m:
            m.setattr(native, "available", lambda: False)
            slow = q.dequantized_weight()  # torch: split the bytes, subtract, multiply
        assert torch.equal(fast, slow) and torch.equal(fast, w.dequantize())


@pytest.mark.parametrize("k", [576, 100])  # 100: a 4-column tail after the 16-wide loop
@pytest.mark.parametrize("tokens", [1, 4, 9])
def test_fgemv_matches_linear(k, tokens):
    g = torch.Generator().manual_seed(k)
    w, b, x = torch.randn(300, k, generator=g), torch.randn(300, generator=g), torch.randn(tokens, k, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    assert _rel(native.fgemv(x, w, b).double(), ref) < 2e-6  # measured 2.5e-7
    assert _rel(native.fgemv(x, w, None).double(), ref - b.double()) < 2e-6


def test_decode_takes_native_by_rule_untimed(random_int_weight, monkeypatch):
    kernels.clear_choices()
    timed: list[int] = []
    monkeypatch.setattr(kernels, "time_call", lambda fn, x, repeats=5: timed.append(x.shape[0]) or 1.0)
    q = QuantLinear(random_int_weight(4, 64, 128, 64, False), bias=torch.randn(64))
    assert q.select_kernel() == {"decode": "native", "prefill": "dequant"}
    assert timed == [] and q.timings == {"decode": {}, "prefill": {}}  # no probe at all: kernel choice is free
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        for part in (x[:1, :1], x[:, :2], x):  # 1 token, 4 tokens (decode), 10 tokens (prefill)
            assert _rel(q(part), q.reference_forward(part)) < 2e-6  # measured <= 4e-7
    kernels.clear_choices()


def test_layers_outside_the_native_layout_keep_torch_kernels(random_int_weight):
    for w in (random_int_weight(3, 32, 128, 32), random_int_weight(4, 32, 128, 32, g_idx=True)):
        assert "native" not in QuantLinear(w)._kernel_names()  # 3-bit words, act-order groups
    assert "native" not in QuantLinear(random_int_weight(4, 32, 128, 32), dtype=torch.bfloat16)._kernel_names()


def test_library_is_built_once_per_machine_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    cc, cxx = native._compilers()
    path = native.library_path(cc, cxx)
    assert path.parent.parent == tmp_path / "kernels" and len(path.parent.name) == 16
    assert native.library_path(cc, cxx) == path  # same sources, compilers, torch and CPU: same place
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert native._load() is False  # switched off: torch's kernels only
