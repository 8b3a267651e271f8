"""Packed modules: the integer normal form, QuantLinear's kernels, and whole-model agreement."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.packed import IntWeight, QuantLinear, int_weight_of, pack_model
from lowbit.packed.kernels import unpack_codes
from lowbit.quantization import quantize


def _spec(bits=4, group=32, symmetric=True):
    return {"type": "int", "bits": bits, "granularity": "group" if group else "channel", "group_size": group,
            "symmetric": symmetric, "signed": symmetric}


def _recipe(method, spec, **options):
    return {"name": f"t-{method}", "methods": [{"method": method, "spec": spec, "options": options}]}


def _naive_dequant(w: IntWeight) -> torch.Tensor:
    out = torch.empty(w.shape)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            g = int(w.g_idx[c]) if w.g_idx is not None else (c // w.group_size if w.group_size else 0)
            z = 0 if w.zero is None else int(w.zero[r, g])
            out[r, c] = float(w.scale[r, g]) * (int(w.codes[r, c]) - z)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantlinear_dequantizes_exactly(bits, symmetric, random_int_weight):
    w = random_int_weight(bits, 16, 64, 32, symmetric, seed=bits)
    q = QuantLinear(w)
    assert torch.equal(unpack_codes(q.weight_packed, bits, w.shape), w.codes)
    assert torch.equal(q.dequantized_weight(), _naive_dequant(w))  # same fp32 ops: exact
    assert q.weight_packed.numel() * 4 == 16 * -(-64 * bits // 32) * 4  # dense int32 words


def test_g_idx_dequantization_matches_naive(random_int_weight):
    w = random_int_weight(4, 16, 64, 32)
    w.g_idx = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    assert torch.equal(QuantLinear(w).dequantized_weight(), _naive_dequant(w))


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_selected_kernel_agrees_with_reference(symmetric, random_int_weight):
    w = random_int_weight(4, 64, 128, 64, symmetric)
    q = QuantLinear(w, bias=torch.randn(64))
    kernels = q._kernels()
    assert "int4pack" in kernels  # 4-bit g64 with integer zeros fits torch's tinygemm layout
    x = torch.randn(3, 5, 128)
    ref = q.reference_forward(x)
    for name, fn in kernels.items():
        err = ((fn(x) - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (name, err)  # measured int4pack 0 (sym) and 7e-8 (asym: float offset)
    chosen = q.select_kernel(prefill_tokens=16)
    assert set(chosen) == {"decode", "prefill"} and set(chosen.values()) <= set(kernels)
    assert torch.allclose(q(x), ref, rtol=1e-4, atol=1e-5)


def test_int8_per_channel_kernel(random_int_weight):
    w = random_int_weight(8, 32, 64, None)
    q = QuantLinear(w)
    assert "int8pack" in q._kernels()
    x = torch.randn(4, 64)
    assert torch.allclose(q._kernels()["int8pack"](x), q.reference_forward(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,symmetric", [("rtn", True), ("rtn", False), ("gptq", True), ("gptq", False)])
def test_packed_model_matches_fake_quant_model(tiny_llama, tiny_calib, method, symmetric):
    quantize(tiny_llama, _recipe(method, _spec(4, 32, symmetric)), tiny_calib, batch_size=4, progress=False)
    ids = tiny_calib[:2]
    with torch.no_grad():
        fake = tiny_llama(ids).logits
    packed = pack_model(tiny_llama)
    assert len(packed) == 14 and all(isinstance(m, QuantLinear) for m in packed.values())
    with torch.no_grad():
        real = tiny_llama(ids).logits
    assert (real - fake).abs().max().item() < 1e-5  # measured 0.0 for all four: same fp32 dequant
    layer = packed["model.layers.0.mlp.down_proj"]
    fp32 = layer.in_features * layer.out_features * 4
    # 4-bit codes + fp32 scales: 5120 / 5376 bytes of 32768 (0.16 sym / asym); with torch's tinygemm layout
    # beside them when the timing picked int4pack: 11264 / 11520 (0.34 / 0.35)
    assert layer.weight_bytes() < (0.4 if layer._int4 is not None else 0.2) * fp32


def test_gptq_act_order_without_static_groups_keeps_g_idx(tiny_llama, tiny_calib):
    recipe = _recipe("gptq", _spec(4, 32, True), act_order=True, static_groups=False)
    quantize(tiny_llama, recipe, tiny_calib, batch_size=4, progress=False)
    layer = tiny_llama.model.layers[0].mlp.down_proj
    w = int_weight_of(layer)
    assert w.g_idx is not None  # groups follow the activation order, not col // 32
    assert torch.allclose(w.dequantize(), layer.weight, atol=1e-6)


def test_unrepresentable_layers_say_why(tiny_llama, tiny_calib):
    model = copy.deepcopy(tiny_llama)
    quantize(model, _recipe("hqq", _spec(4, 32, False)), tiny_calib, batch_size=4, progress=False)
    with pytest.raises(LowbitError, match="model.layers.0.self_attn.q_proj: zero points are fractional"):
        pack_model(model)
    with pytest.raises(LowbitError, match="not quantized by lowbit"):
        int_weight_of(torch.nn.Linear(4, 4))
