"""QuaRot: Hadamard construction, exact equivalence of the rotated fp model, outliers spread, W4A4 effect."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quantization import quantize
from lowbit.rotation.hadamard import hadamard, random_hadamard
from lowbit.transforms import get_transform


@pytest.mark.parametrize("n", [1, 2, 12, 64, 576, 1536, 5120])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))  # exact in float64


def test_unbuilt_order_falls_back_to_random_orthogonal():
    with pytest.raises(LowbitError, match="no Hadamard matrix of order 6"):
        hadamard(6)
    q = random_hadamard(6, 0)
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=q.dtype), atol=1e-12)


def test_random_hadamard_spreads_an_outlier():
    x = torch.zeros(576, dtype=torch.float64)
    x[17] = 100.0
    y = x @ random_hadamard(576, 0)
    assert torch.allclose(y.abs(), torch.full_like(y, 100 / 24))  # 100 / sqrt(576) in every coordinate


def _perturb_norms(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + torch.rand(norm.weight.shape, generator=g))
        model.model.norm.weight.copy_(1 + torch.rand(model.model.norm.weight.shape, generator=g))


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_fp_model_computes_the_same_function(tiny_llama, tiny_calib, tied):
    if tied:
        tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight
        tiny_llama.config.tie_word_embeddings = True
    _perturb_norms(tiny_llama)
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    get_transform("quarot").apply_model(tiny_llama)
    with torch.no_grad():
        got = tiny_llama(tiny_calib[:2]).logits
    assert (got - ref).abs().max().item() < 1e-5  # measured 4.8e-7 (untied) and 6.0e-7 (tied)
    assert tiny_llama.lm_head.weight is not tiny_llama.model.embed_tokens.weight
    assert torch.equal(tiny_llama.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_unknown_architecture_is_refused_before_work(tiny_llama, tiny_calib):
    tiny_llama.config.model_type = "gpt_neox"
    recipe = {"name": "x", "transforms": [{"transform": "quarot"}],
              "methods": [{"method": "rtn", "spec": "W8", "activations": "A4_TOKEN"}]}
    before = tiny_llama.model.embed_tokens.weight.clone()
    with pytest.raises(LowbitError, match="rotation mapping is known for llama"):
        quantize(tiny_llama, recipe, tiny_calib, progress=False)
    assert torch.equal(tiny_llama.model.embed_tokens.weight, before)


def test_w4a4_rotated_model_saves_and_reloads(tiny_llama, tiny_calib, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import save_quantized

    report = quantize(tiny_llama, "w4a4-quarot-rtn", tiny_calib, progress=False)
    assert report.extra["transforms"]["quarot"][0]["online_down"] == 128
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    out, fmt = save_quantized(tiny_llama, None, report, tmp_path / "q")  # auto: no compressed-tensors form
    assert fmt == "fake-quant"
    back, _ = load_model(out, require_tokenizer=False)
    with torch.no_grad():
        d = (back(tiny_calib[:2]).logits - ref).abs().max().item()
        assert d < 1e-5  # measured 0.0
