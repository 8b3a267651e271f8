"""sparse-bitmask: bit packing against numpy's little-endian packbits (compressed-tensors' convention), exact round
trips, a pruned model saved smaller and loaded back with identical weights, and a clear error when nothing is
pruned."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.export.sparse_bitmask import compress, decompress, pack_mask, unpack_mask
from lowbit.models.loading import load_model
from lowbit.quantization import quantize, save_quantized


def test_bit_packing_matches_numpy_little_endian():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 19, generator=g) > 0.5
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack_mask(mask).numpy(), ref)
    assert torch.equal(unpack_mask(pack_mask(mask), 19), mask)


def test_compress_round_trip_is_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 24, generator=g)
    w[torch.rand(7, 24, generator=g) < 0.6] = 0
    parts = compress(w)
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert parts["row_offsets"].tolist() == [int((w[:r] != 0).sum()) for r in range(7)]
    assert torch.equal(decompress(parts), w)
    bad = dict(parts, compressed=parts["compressed"][:-1])
    with pytest.raises(LowbitError, match="values but"):
        decompress(bad)


def test_pruned_model_saves_smaller_and_loads_identical(tiny_llama, tiny_calib, tmp_path):
    quantize(tiny_llama, "sparsegpt50", tiny_calib, batch_size=4, progress=False)
    out, fmt = save_quantized(tiny_llama, None, None, tmp_path / "sb", "sparse-bitmask")
    dense, _ = save_quantized(tiny_llama, None, None, tmp_path / "dense", "fake-quant")
    assert fmt == "sparse-bitmask"
    loaded, _ = load_model(out, require_tokenizer=False)
    for (n, a), (_, b) in zip(tiny_llama.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, loaded(ids).logits)
    sb_size = (out / "model.safetensors").stat().st_size
    dense_size = (dense / "model.safetensors").stat().st_size
    assert sb_size < dense_size  # linears at 17/32 of their fp32 bytes; embeddings and head stay dense


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors.compressors.sparse_compressors") is None,
                    reason="compressed-tensors dropped its sparse compressors after 0.14")
def test_compressed_tensors_decompresses_the_same_weights(tmp_path):  # pragma: no cover - needs compressed-tensors <= 0.14
    from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import bitmask_decompress

    w = torch.randn(6, 40)
    w[w.abs() < 0.7] = 0
    p = compress(w)
    assert torch.equal(bitmask_decompress(p["compressed"], p["bitmask"], list(w.shape)), w)


def test_unpruned_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(LowbitError, match="no linear layer of this model has zero weights"):
        save_quantized(tiny_llama, None, None, tmp_path / "x", "sparse-bitmask")
    assert not (tmp_path / "x").exists()
