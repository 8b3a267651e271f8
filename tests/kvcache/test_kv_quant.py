"""KV-cache quantization math against naive references, and the cache's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kvcache import KVCacheConfig, QuantizedKVLayer, kv_preset
from lowbit.kvcache.cache import rope_apply, rope_undo
from lowbit.kvcache.quant import GrowingTensor, PackedKV, dequantize_kv, fake_quant_kv, quantize_kv


def _naive(x: torch.Tensor, bits: int, axis: str, group: int) -> torch.Tensor:
    """Loop over every group: asymmetric min/max, fp16 scale and minimum, round, clamp."""
    b, h, t, d = x.shape
    out = torch.empty_like(x)
    top = 2 ** bits - 1
    for i in range(b):
        for j in range(h):
            if axis == "token":
                spans = [(tt, slice(c, c + group)) for tt in range(t) for c in range(0, d, group)]
            else:
                spans = [(slice(tt, tt + group), c) for tt in range(0, t, group) for c in range(d)]
            for a, c in spans:
                v = x[i, j, a, c]
                lo, hi = v.min(), v.max()
                s = ((hi - lo) / top).half().float()
                lo = lo.half().float()
                q = ((v - lo) / (s if s > 0 else 1.0)).round().clamp(0, top)
                out[i, j, a, c] = q * s + lo
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", 8), ("token", 16), ("channel", 4)])
def test_codes_match_a_naive_reference(bits, axis, group):
    x = torch.randn(2, 3, 8, 16, generator=torch.Generator().manual_seed(bits))
    got = fake_quant_kv(x, bits, axis, group)
    assert torch.allclose(got, _naive(x, bits, axis, group), atol=1e-6)


def test_codes_are_packed_to_their_bit_width():
    x = torch.randn(1, 2, 32, 16)
    codes, scale, minimum, _ = quantize_kv(x, 2, "token", 16)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() // 4  # 4 codes per byte
    assert scale.dtype == torch.float16 and scale.numel() == 2 * 32
    back = dequantize_kv(codes, scale, minimum, 2, "token", 16)
    assert back.shape == x.shape


def test_outliers_are_kept_exactly_and_leave_the_range():
    x = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 1, 5] = 80.0
    plain = fake_quant_kv(x, 4, "token", 64)
    split = fake_quant_kv(x, 4, "token", 64, outliers=0.02)
    assert split[0, 0, 1, 5] == 80.0
    row_err = [(q[0, 0, 1] - x[0, 0, 1]).pow(2).mean().item() for q in (plain, split)]
    assert row_err[1] < row_err[0] / 50  # measured 0.0071 vs 4.19


def test_packed_store_appends_like_one_block():
    x = torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(1))
    for axis, group in (("token", 8), ("channel", 8)):
        store = PackedKV(4, axis, group, outliers=0.05)
        for a in range(0, 24, 8):
            store.append(x[:, :, a:a + 8])
        assert torch.equal(store.dequantize(torch.float32), fake_quant_kv(x, 4, axis, group, outliers=0.05))


def test_packed_store_dequantizes_in_chunks_like_at_once():
    x = torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(2))
    for axis in ("token", "channel"):
        store = PackedKV(3, axis, 8, outliers=0.03)
        store.append(x)
        out = torch.full((2, 2, 50, 16), 7.0)  # a view into a bigger buffer, as the cache passes
        store.dequantize_into(out[:, :, 5:45], chunk_tokens=16)
        assert torch.equal(out[:, :, 5:45], fake_quant_kv(x, 3, axis, 8, outliers=0.03))
        assert (out[:, :, :5] == 7).all() and (out[:, :, 45:] == 7).all()


def test_growing_tensor_appends_like_cat_and_keeps_spare_room_small():
    grow, parts = GrowingTensor(2), []
    for n in (3, 1, 1, 7, 1, 20):
        parts.append(torch.randn(1, 2, n, 4))
        grow.append(parts[-1])
    assert torch.equal(grow.view(), torch.cat(parts, dim=2))
    assert grow.nbytes() == 33 * 8 * 4 and grow.data.shape[2] <= 33 * 5 // 4
    assert grow.allocated_nbytes() == grow.data.shape[2] * 8 * 4 >= grow.nbytes()  # spare room counted here only


def test_rope_undo_inverts_rope():
    x = torch.randn(1, 2, 5, 8)
    theta = torch.rand(1, 1, 5, 4) * 6
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    assert torch.allclose(rope_undo(rope_apply(x, cos, sin), cos, sin), x, atol=1e-6)


def test_layer_keeps_sink_and_residual_in_full_precision():
    cfg = KVCacheConfig(bits=2, key_axis="channel", value_axis="token", key_group=4, value_group=8, residual=6, sink=1)
    layer = QuantizedKVLayer(cfg)
    k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    out_k, out_v = layer.update(k[:, :, :13], v[:, :, :13])
    # 13 tokens: 1 sink, then 12: residual keeps >= 6, groups of 4 leave -> 4 quantized, 8 in fp
    assert layer.body_k.tokens == 4 and layer.res_k.shape[2] == 8
    assert torch.equal(out_k[:, :, 0], k[:, :, 0]) and torch.equal(out_k[:, :, 5:13], k[:, :, 5:13])
    assert not torch.equal(out_k[:, :, 1:5], k[:, :, 1:5])
    for t in range(13, 20):  # one token at a time, as in decoding
        out_k, out_v = layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert layer.get_seq_length() == 20 and out_k.shape[2] == 20
    assert layer.body_k.tokens == 12 and layer.res_k.shape[2] == 7


def test_layers_share_one_output_buffer_without_autograd():
    from lowbit.kvcache.cache import KVScratch

    cfg = KVCacheConfig(bits=4, key_axis="channel", value_axis="token", key_group=4, value_group=8, residual=4)
    scratch = KVScratch()
    k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    with torch.enable_grad():
        fresh = QuantizedKVLayer(cfg).update(k, v)
    with torch.no_grad():
        first = QuantizedKVLayer(cfg, scratch=scratch).update(k, v)
        assert torch.equal(first[0], fresh[0]) and torch.equal(first[1], fresh[1]) and first[0].is_contiguous()
        second = QuantizedKVLayer(cfg, scratch=scratch).update(k * 2, v)
    assert first[0].data_ptr() == second[0].data_ptr()  # the next layer writes over the same memory
    assert fresh[0].data_ptr() != first[0].data_ptr()


def test_hadamard_rotation_spreads_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 16, 64, generator=g), torch.randn(1, 2, 16, 64, generator=g)
    k[..., 5] *= 30  # a key channel with outliers, as real models have
    err = {}
    for rotate in (False, True):
        layer = QuantizedKVLayer(KVCacheConfig(bits=4, rotate=rotate))
        out_k, out_v = layer.update(k, v)
        err[rotate] = ((out_k - k).pow(2).mean().item(), (out_v - v).pow(2).mean().item())
    assert err[True][0] < err[False][0] / 4, err  # measured MSE keys 0.634 -> 0.055 (values 0.0082 -> 0.0080)
    exact = QuantizedKVLayer(KVCacheConfig(bits=8, rotate=True, residual=16)).update(k, v)
    assert torch.equal(exact[0], k)  # nothing left the full-precision window: rotation never touched it


def test_bad_settings_are_refused():
    with pytest.raises(LowbitError, match="bits must be one of"):
        KVCacheConfig(bits=5)
    with pytest.raises(LowbitError, match="set key_group"):
        KVCacheConfig(bits=4, key_axis="channel")
    with pytest.raises(LowbitError, match="unknown KV-cache preset"):
        kv_preset("KIVI7")
    with pytest.raises(LowbitError, match="unknown KV-cache option"):
        KVCacheConfig.from_dict({"preset": "KIVI2", "window": 3})
