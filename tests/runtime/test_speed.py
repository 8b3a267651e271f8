"""Inference measurements on the tiny model: packed weights really shrink, kernels get chosen, numbers are sane."""

from __future__ import annotations

import torch

from lowbit.packed import pack_model
from lowbit.quantization import quantize
from lowbit.runtime.speed import measure_speed, weight_bytes


def test_packed_model_holds_fewer_weight_bytes_and_runs(tiny_llama, tiny_calib):
    fp_bytes = weight_bytes(tiny_llama)
    spec = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True}
    quantize(tiny_llama, {"name": "q", "methods": [{"method": "rtn", "spec": spec}]}, tiny_calib, progress=False)
    pack_model(tiny_llama)
    packed_bytes = weight_bytes(tiny_llama)
    linear = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q,o + k,v + gate,up,down per block, x2 blocks
    # fp32 -> 4-bit + one fp32 scale per 32: each linear weight shrinks from 32 to 5 bits
    assert fp_bytes - packed_bytes == linear * 4 - linear * 5 // 8  # before any forward: packed codes only
    res = measure_speed(tiny_llama, tiny_calib[:1], new_tokens=4, repeats=1)
    assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0
    assert sum(res.kernels.values()) == 14
    extra = sum(sum(t.numel() * t.element_size() for t in m._int4) for m in tiny_llama.modules()
                if getattr(m, "_int4", None) is not None)
    assert res.weight_bytes == packed_bytes + extra  # a tinygemm layout, where chosen, is counted too


def test_decode_matches_full_forward(tiny_llama, tiny_calib):
    """The KV-cache decode the benchmark times computes the same next tokens as full forwards."""
    from lowbit.runtime.speed import _decode_seconds  # noqa: F401  (the timed loop)

    ids = tiny_calib[:1, :8]
    with torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(4):
            seq = torch.cat([seq, tiny_llama(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
