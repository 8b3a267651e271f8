"""Input quantizers: exact against naive references, calibration, attach/detach, bad specs."""

from __future__ import annotations

import pytest
import torch

from lowbit.activations import ActQuantizer, attach_input_quantizer, detach_input_quantizers, input_quantizers
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


def _naive_token_int8(x: torch.Tensor, levels: float) -> torch.Tensor:
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        s = row.abs().max() / levels
        out[i] = torch.clamp(torch.round(row / s), -128, 127) * s
    return out


@pytest.mark.parametrize("full_range,levels", [(False, 127.0), (True, 127.5)])
def test_dynamic_per_token_int8_matches_naive(full_range, levels):
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 9, 48)
    q = ActQuantizer(QuantSpec(type="int", bits=8, granularity="token", dynamic=True, full_range=full_range))
    got = q(x)
    want = _naive_token_int8(x.reshape(-1, 48), levels).reshape(x.shape)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)  # measured max diff 4.8e-7 (one fp32 ulp of the scale)


def test_static_per_tensor_uses_the_calibrated_range():
    g = torch.Generator().manual_seed(1)
    q = ActQuantizer(QuantSpec(type="int", bits=8, granularity="tensor"))
    x = torch.randn(64, 32, generator=g)
    assert torch.equal(q(x), x)  # uncalibrated: identity
    for chunk in x.split(16):
        q.observe(chunk)
    q.freeze()
    s = x.abs().max() / 127
    y = torch.randn(10, 32, generator=g) * 3  # values beyond the calibrated range clip
    want = torch.clamp(torch.round(y / s), -128, 127) * s  # signed grid: code -128 is used too
    assert torch.allclose(q(y), want, atol=1e-6)  # measured 0 to 4.8e-7
    assert q(y).max() <= x.abs().max() + 1e-6


def test_fp8_dynamic_per_token_matches_torch_cast():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 5
    q = ActQuantizer(QuantSpec(type="float", fmt="e4m3", bits=8, granularity="token", dynamic=True))
    s = x.abs().amax(1, keepdim=True) / 448.0
    want = (x / s).to(torch.float8_e4m3fn).float() * s
    assert torch.allclose(q(x), want, rtol=0, atol=1e-6)  # measured max diff 0.0


def test_attach_leaves_the_state_dict_alone_and_detaches(tiny_llama):
    before = set(tiny_llama.state_dict())
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        attach_input_quantizer(tiny_llama.get_submodule(name), QuantSpec(type="int", bits=4, granularity="token", dynamic=True))
    assert set(tiny_llama.state_dict()) == before
    assert sorted(input_quantizers(tiny_llama)) == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        assert (tiny_llama(ids).logits - ref).abs().max() > 1e-4  # 4-bit inputs change the output
    assert detach_input_quantizers(tiny_llama) == 2
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, ref)


@pytest.mark.parametrize("spec,needle", [
    (QuantSpec(type="codebook", fmt="nf4", bits=4, granularity="group", group_size=64), "weights only"),
    (QuantSpec(type="int", bits=8, granularity="channel"), "static activation ranges are per tensor"),
    (QuantSpec(type="int", bits=8, granularity="channel", dynamic=False), "set dynamic: true"),
])
def test_specs_that_cannot_quantize_activations(spec, needle):
    with pytest.raises(LowbitError, match=needle):
        ActQuantizer(spec)


def test_static_quantizer_without_data_says_so():
    q = ActQuantizer(QuantSpec(type="int", bits=8, granularity="tensor"))
    with pytest.raises(LowbitError, match="saw no calibration inputs"):
        q.freeze()
