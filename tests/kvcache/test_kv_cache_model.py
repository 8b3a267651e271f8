"""The quantized cache inside transformers: generate, perplexity, recipes and checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kvcache import QuantizedKVCache


def _greedy(model, ids, n, cache=None):
    kw = {} if cache is None else {"past_key_values": cache}
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)[0, ids.shape[1]:]


def test_generate_runs_with_every_preset_and_a_wide_residual_is_exact(tiny_llama, tiny_calib):
    ids = tiny_calib[:1, :16]
    ref = _greedy(tiny_llama, ids, 12)
    for preset in ("KV8", "KV4", "KV2", "KIVI4", "KIVI2", "KVQUANT4_UNIFORM"):
        cache = QuantizedKVCache(tiny_llama, preset)
        out = _greedy(tiny_llama, ids, 12, cache)
        assert out.shape == ref.shape and cache.get_seq_length() == 16 + 11
    # 27 tokens never leave KIVI's 128-token full-precision window: identical to the fp cache
    assert torch.equal(_greedy(tiny_llama, ids, 12, QuantizedKVCache(tiny_llama, "KIVI2")), ref)


def test_chunked_prefill_generates_the_same_text(tiny_llama, tiny_calib):
    from lowbit.runtime.speed import generate_text

    class Tok:  # token ids as text: the tiny model has no tokenizer
        eos_token_id = pad_token_id = 0

        def __call__(self, text, return_tensors):
            return type("Enc", (), {"input_ids": torch.tensor([[int(t) for t in text.split()]])})

        def decode(self, ids, skip_special_tokens):
            return " ".join(str(int(i)) for i in ids)

    prompt = " ".join(str(int(t)) for t in tiny_calib[0, :24])
    for kv in ("none", "KV4", "KIVI2"):
        whole = generate_text(tiny_llama, Tok(), prompt, 10, kv)
        assert generate_text(tiny_llama, Tok(), prompt, 10, kv, prefill_chunk=5) == whole
    with pytest.raises(LowbitError, match="positive number of tokens"):
        generate_text(tiny_llama, Tok(), prompt, 10, "KV4", prefill_chunk=0)


def test_cache_bytes_shrink_with_the_bits(tiny_llama, tiny_calib):
    sizes = {}
    for preset in ("KV8", "KV4", "KV2"):
        cache = QuantizedKVCache(tiny_llama, preset)
        with torch.no_grad():
            tiny_llama(tiny_calib[:1], past_key_values=cache, use_cache=True)
        sizes[preset] = cache.nbytes()
        # allocated: the same packed blocks (sized exactly by one prefill) plus the one shared pair of
        # fp32 output buffers, 1 x 2 heads x 32 tokens x 16 dims each
        assert cache.allocated_nbytes() == sizes[preset] + 2 * (2 * 32 * 16 * 4)
    fp32 = 2 * 2 * 32 * 2 * 16 * 4  # layers x (k, v) x tokens x kv heads x head_dim x 4 bytes = 16384
    # codes plus an fp16 scale and minimum per 16-value head vector: 8 bits -> 4096 + 1024 ...
    assert sizes == {"KV8": 4096 + 1024, "KV4": 2048 + 1024, "KV2": 1024 + 1024}
    assert sizes["KV8"] < fp32 / 3


def test_pre_rope_keys_match_post_rope_at_8_bits(tiny_llama, tiny_calib):
    from lowbit.kvcache import KVCacheConfig

    logits = {}
    for name, pre in (("post", False), ("pre", True)):
        cfg = KVCacheConfig(bits=8, key_axis="channel", key_group=8, pre_rope=pre)
        with torch.no_grad():
            logits[name] = tiny_llama(tiny_calib[:1], past_key_values=QuantizedKVCache(tiny_llama, cfg),
                                      use_cache=True).logits
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:1]).logits
    assert (logits["pre"] - ref).abs().max() < 0.02  # measured 2.0e-3 for both (the values dominate)
    assert (logits["post"] - ref).abs().max() < 0.02


def test_unknown_attention_layout_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(LowbitError, match="model type 'gpt2' is not among them"):
        QuantizedKVCache(model, "KV4")


def test_recipe_kv_cache_is_saved_and_used_after_loading(tiny_llama, tiny_calib, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    recipe = {"name": "w8-kivi2", "methods": [{"method": "rtn", "spec": "W8"}], "kv_cache": "KIVI2"}
    report = quantize(tiny_llama, recipe, tiny_calib, progress=False)
    assert report.recipe["kv_cache"]["name"] == "KIVI2"
    out, _ = save_quantized(tiny_llama, None, report, tmp_path / "q", format="fake-quant")
    back, _ = load_model(out, require_tokenizer=False)
    assert back.lowbit_kv_cache.name == "KIVI2" and back.lowbit_kv_cache.residual == 128
    with pytest.raises(LowbitError, match="kv_cache: KV-cache bits must be one of"):
        quantize(tiny_llama, {"name": "x", "methods": [{"method": "rtn", "spec": "W8"}], "kv_cache": {"bits": 5}},
                 tiny_calib, progress=False)


@pytest.mark.parametrize("recipe,kv", [("w4a4kv4-quarot", "KV4_QUAROT"), ("gptq-w4g64-kivi4", "KIVI4")])
def test_composed_recipes_quantize_weights_inputs_and_cache(recipe, kv, tiny_llama, tiny_calib):
    from lowbit.kvcache import kv_setting
    from lowbit.quantization import quantize

    report = quantize(tiny_llama, recipe, tiny_calib, progress=False)
    assert report.recipe["kv_cache"]["name"] == kv
    tiny_llama.lowbit_kv_cache = kv_setting(None, report.recipe["kv_cache"])
    ids = tiny_calib[:1]
    out = _greedy(tiny_llama, ids, 8, QuantizedKVCache(tiny_llama, kv_setting(tiny_llama)))
    assert out.shape == (8,)


@pytest.mark.model
def test_real_model_kv8_is_lossless_and_kivi2_beats_naive_2bit(smollm, data_dir):
    from lowbit.eval.perplexity import evaluate

    model, tok = smollm
    ppl = {kv: evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=1, kv_cache=kv).perplexity
           for kv in ("none", "KV8", "KV2", "KIVI2")}
    assert abs(ppl["KV8"] / ppl["none"] - 1) < 0.005  # measured fp 15.147, KV8 15.140
    assert ppl["KIVI2"] < ppl["KV2"] / 5  # measured 36.6 vs 909.5
    with pytest.raises(LowbitError, match="nothing would be quantized"):
        evaluate(model, tok, "wikitext2", "test", seqlen=128, max_windows=1, kv_cache="KIVI2")


def test_intactkv_pivots_come_from_the_fp_model(tiny_llama, tiny_calib):
    import copy

    from lowbit.kvcache import KVCacheConfig, new_kv_cache
    from lowbit.quantization import quantize

    fp = copy.deepcopy(tiny_llama)
    quantize(tiny_llama, {"name": "w2", "methods": [{"method": "rtn", "spec": {"type": "int", "bits": 2,
                                                                               "granularity": "channel"}}]},
             tiny_calib, progress=False)
    cfg = KVCacheConfig(bits=8, intact=1)
    ids = tiny_calib[:1]
    with pytest.raises(LowbitError, match="full-precision model"):
        new_kv_cache(tiny_llama, cfg, ids)
    cache = new_kv_cache(tiny_llama, cfg, ids, fp)
    with torch.no_grad():
        tiny_llama(ids, past_key_values=cache, use_cache=True)
        ref = QuantizedKVCache(fp, KVCacheConfig(bits=8, sink=1))
        fp(ids, past_key_values=ref, use_cache=True)
    for layer, fp_layer in zip(cache.layers, ref.layers):  # a 1-token vs a 32-token fp forward: rounding only
        assert torch.allclose(layer.sink_k, fp_layer.sink_k, atol=1e-6)
        assert torch.allclose(layer.sink_v, fp_layer.sink_v, atol=1e-6)
    body = [c.layers[1].body_k.dequantize(torch.float32) for c in (cache, ref)]
    assert not torch.equal(*body)  # the other tokens are the quantized model's own
