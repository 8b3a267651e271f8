"""GGUF block encodings against the gguf package's own decoder, and the rotary row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.export.gguf import rope_permute
from lowbit.export.gguf_blocks import BLOCK_TYPES, decode, encode_exact, encode_requantized, exact_fit
from lowbit.packed import IntWeight


def _weight(bits, symmetric, group, rows=8, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (rows, cols), generator=g).to(torch.int8)
    ng = cols // group if group else 1
    scale = (torch.rand(rows, ng, generator=g) * 0.02 + 0.001).half().float()  # fp16-representable
    zero = None if symmetric else torch.randint(-half, half, (rows, ng), generator=g).to(torch.int8)
    return IntWeight(codes, scale, zero, bits, group)


CASES = [(t, bits, sym, group) for t in BLOCK_TYPES for bits in (3, 4, 5, 8) for sym in (True, False)
         for group in (32, 64, None) if exact_fit(_weight(bits, sym, group), BLOCK_TYPES[t]) is None]


@pytest.mark.parametrize("type_name,bits,symmetric,group", CASES)
def test_codes_land_on_the_gguf_grid(type_name, bits, symmetric, group):
    t = BLOCK_TYPES[type_name]
    w = _weight(bits, symmetric, group, seed=bits)
    raw = encode_exact(w, t)
    assert raw.dtype == np.uint8 and raw.shape == (8, 128 // 32 * t.bytes_per_block)
    got, want = decode(raw, t, w.shape), w.dequantize()
    if symmetric:
        assert torch.equal(got, want)  # d = fp16 scale, codes shifted: exact
    else:  # m = -d * (z + offset) is rounded to fp16: at most half an fp16 ulp of |m| per block
        bound = (want.abs().max() + 0.02 * 32).item() * 2.0 ** -11
        assert (got - want).abs().max().item() <= bound


def test_exact_fit_reasons():
    assert "no zero point" in exact_fit(_weight(4, False, 32), BLOCK_TYPES["Q4_0"])
    assert "do not fit" in exact_fit(_weight(5, True, 32), BLOCK_TYPES["Q4_0"])
    w = _weight(4, True, 32)
    w.group_size = 16
    assert "not a multiple of 32" in exact_fit(w, BLOCK_TYPES["Q4_0"])
    w = _weight(4, True, 32)
    w.g_idx = torch.zeros(128, dtype=torch.int32)
    assert "g_idx" in exact_fit(w, BLOCK_TYPES["Q8_0"])
    with pytest.raises(ValueError, match="cannot hold these codes exactly"):
        encode_exact(_weight(8, True, 32), BLOCK_TYPES["Q4_0"])


def test_requantized_q4_0_follows_llama_cpp_rule():
    """llama.cpp's Q4_0: d = (signed extreme) / -8, so the extreme itself is a grid point."""
    x = torch.linspace(-1.0, 0.6, 32).reshape(1, 32)
    raw = encode_requantized(x, BLOCK_TYPES["Q4_0"])
    y = decode(raw, BLOCK_TYPES["Q4_0"], (1, 32))
    assert y[0, 0].item() == pytest.approx(-1.0, abs=1e-3)  # -8 * d with d = 1/8
    assert (y - x).abs().max().item() <= 1 / 16 + 1e-3  # half a step


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_rope_permute_is_undone_by_transformers(n_head):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(n_head * 8 * 5, dtype=torch.float32).reshape(n_head * 8, 5)
    there = rope_permute(w, n_head)
    assert not torch.equal(there, w)
    back = LlamaTensorProcessor()._reverse_permute_weights(there.numpy(), n_head, n_head)
    assert np.array_equal(back, w.numpy())
