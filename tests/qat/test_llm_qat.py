"""LLM-QAT: logit distillation with weights, activations and the KV cache fake-quantized in training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.activations.attach import act_quantizer_of
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import kv_cache_factory, window_metrics
from lowbit.kvcache.cache import QuantizedKVCache
from lowbit.kvcache.fake import FakeQuantKVCache
from lowbit.qat.distill import kl_to_teacher
from lowbit.qat.fake_linear import FakeQuantLinear, convert_fake_quant, prepare_fake_quant
from lowbit.quantization import quantize
from lowbit.quantized_layers import quantized_weight
from lowbit.spec import QuantSpec, preset

W4_CHANNEL = QuantSpec(type="int", bits=4, granularity="channel")
RECIPE = {"name": "t", "kv_cache": "KV4", "methods": [
    {"method": "llm-qat", "spec": {"type": "int", "bits": 4, "granularity": "channel"}, "activations": "A8_TOKEN",
     "options": {"steps": 30, "lr": 3e-4, "batch": 4}}]}


def test_kl_matches_naive_reference_and_is_zero_on_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    for temp in (1.0, 2.0):
        ps, pt = F.softmax(s / temp, -1), F.softmax(t / temp, -1)
        naive = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp ** 2
        assert kl_to_teacher(s, t, temp, chunk=3).item() == pytest.approx(naive.item(), rel=1e-5)
    assert kl_to_teacher(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_fake_kv_cache_gives_the_inference_cache_values_with_gradients(tiny_llama):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids, past_key_values=QuantizedKVCache(tiny_llama, "KV4"), use_cache=True).logits
    fq = tiny_llama(input_ids=ids, past_key_values=FakeQuantKVCache(tiny_llama, "KV4"), use_cache=True).logits
    plain = tiny_llama(input_ids=ids).logits
    assert torch.allclose(fq, ref, atol=1e-5)  # measured max |diff| ~1e-7 (same quantize / dequantize)
    assert not torch.allclose(fq, plain, atol=1e-3)  # the 4-bit cache changes the logits
    fq.square().mean().backward()
    assert tiny_llama.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0  # straight through the cache


def test_fake_kv_cache_refuses_settings_training_cannot_reproduce(tiny_llama):
    with pytest.raises(LowbitError, match="per-token caches only"):
        FakeQuantKVCache(tiny_llama, "KIVI4")


def test_minmax_fake_linear_trains_the_weight_and_converts_to_its_own_rtn_codes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    fq = FakeQuantLinear.from_linear(lin, W4_CHANNEL, learn_range=False)
    assert [n for n, _ in fq.named_parameters()] == ["weight", "bias"]
    x = torch.randn(16, 64)
    fq(x).square().sum().backward()
    assert torch.equal(fq.weight.grad, (2 * fq(x).detach()).T @ x)  # min-max clips nothing: the identity
    out = fq.convert()
    assert torch.equal(out.weight, fq.fake_weight().detach())
    assert quantized_weight(out).method == "qat"


def test_input_quantizer_moves_with_the_layer_both_ways(tiny_llama):
    from lowbit.activations.attach import attach_input_quantizer

    name = "model.layers.0.mlp.up_proj"
    q = attach_input_quantizer(tiny_llama.get_submodule(name), preset("A8_TOKEN"))
    prepare_fake_quant(tiny_llama, [name], W4_CHANNEL, learn_range=False)
    assert act_quantizer_of(tiny_llama.get_submodule(name)) is q
    convert_fake_quant(tiny_llama)
    assert act_quantizer_of(tiny_llama.get_submodule(name)) is q


def test_llm_qat_lowers_kl_to_the_fp_model_below_round_to_nearest(tiny_llama):
    ids = torch.randint(0, 256, (16, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # weights 5x the init's: logits far enough from uniform for distillation to matter
        for p in tiny_llama.parameters():
            if p.dim() == 2:
                p.mul_(5)
    fp = copy.deepcopy(tiny_llama)
    rtn = copy.deepcopy(tiny_llama)
    rtn_recipe = {**RECIPE, "methods": [{**RECIPE["methods"][0], "method": "rtn", "options": {}}]}
    quantize(rtn, rtn_recipe, ids, progress=False)
    report = quantize(tiny_llama, RECIPE, ids, progress=False)
    rec = report.extra["methods"]["llm-qat"][0]
    assert rec["kv_cache"] == "KV4" and rec["tokens"] == 30 * 4 * 48
    assert rec["kl_last10"] < 0.7 * rec["kl_first10"]  # measured 0.0367 -> 0.0213

    def kl(model):
        with torch.no_grad():
            s = model(input_ids=ids, past_key_values=QuantizedKVCache(model, "KV4"), use_cache=True).logits
            return kl_to_teacher(s, fp(input_ids=ids).logits).item()

    assert kl(tiny_llama) < 0.7 * kl(rtn)  # measured 0.0205 vs 0.0445 (inference cache, packed codes)
    layer = tiny_llama.get_submodule("model.layers.1.self_attn.o_proj")
    assert quantized_weight(layer).method == "llm-qat" and act_quantizer_of(layer) is not None
    assert not any(p.requires_grad is False for p in fp.parameters())  # the caller's flags are restored


def test_llm_qat_rejects_untrainable_specs():
    from lowbit.methods import get_method

    kmeans = QuantSpec(type="codebook", fmt="kmeans", bits=3, granularity="channel")
    with pytest.raises(LowbitError, match="no gradient reaches its table"):
        get_method("llm-qat", kmeans)
    with pytest.raises(LowbitError, match="learnable-range .* takes int specs"):
        get_method("llm-qat", preset("NF4"), {"learn_range": True})


@pytest.mark.parametrize("name", ["NF4", "MXFP4"])
def test_minmax_training_takes_float_and_fixed_codebook_specs(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    fq = FakeQuantLinear.from_linear(lin, preset(name), learn_range=False)
    x = torch.randn(16, 64)
    fq(x).square().sum().backward()
    assert fq.weight.grad.abs().sum() > 0  # straight through the format's rounding
    out = fq.convert()
    assert torch.equal(out.weight, fq.fake_weight().detach())
    assert quantized_weight(out).spec.type == preset(name).type
