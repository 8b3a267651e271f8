"""The static-cache decoder: the same greedy tokens as transformers' own generation, chunked or not,
compiled or eager, fp32 or packed 4-bit; ``native_linears`` leaves the model's tensors untouched."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.packed import native, pack_model
from lowbit.quantization import quantize
from lowbit.runtime.decode import DecodeLinear, StaticDecoder, native_linears


def _hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _packed_int4(model, calib):
    spec = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}
    quantize(model, {"name": "q", "methods": [{"method": "rtn", "spec": spec}]}, calib, progress=False)
    pack_model(model)
    return model


def test_eager_static_decoder_matches_transformers_generate(tiny_llama, tiny_calib):
    ids = tiny_calib[:1, :12]
    want = _hf_greedy(tiny_llama, ids, 10)
    for chunk in (None, 5):  # the whole prompt at once, or 5 + 5 + 2 tokens
        got = StaticDecoder(tiny_llama, 64, compile=False, prefill_chunk=chunk).generate(ids, 10)
        assert got.tokens == want, chunk
        assert got.decode_steps == 9 and got.compile_s == 0.0


def test_compiled_step_gives_the_eager_tokens_on_packed_weights(tiny_llama, tiny_calib):
    """torch.compile of the decode step (inductor, C++ on this CPU) against the same step run eagerly."""
    model = _packed_int4(tiny_llama, tiny_calib)
    ids = tiny_calib[:1, :16]
    eager = StaticDecoder(model, 64, compile=False).generate(ids, 24, keep_logits=True)
    dec = StaticDecoder(model, 64, compile=True)
    first = dec.generate(ids, 24, keep_logits=True)
    assert first.compile_s > 0 and first.decode_steps == 22  # the compiling step is not timed as decode
    assert first.tokens == eager.tokens  # token for token
    worst = max((a - b).abs().max().item() for a, b in zip(first.step_logits, eager.step_logits))
    assert worst < 1e-5  # measured 8.9e-8: inductor fuses the norms and RoPE, reassociating fp32 sums
    again = dec.generate(ids, 24)  # the cache is reset, the compiled step reused
    assert again.tokens == eager.tokens and again.compile_s == 0.0 and again.decode_steps == 23
    if native.available():
        assert {m.kernel["decode"] for m in model.modules() if hasattr(m, "kernel")} == {"native"}


def test_static_decoder_refuses_what_does_not_fit(tiny_llama, tiny_calib):
    with pytest.raises(LowbitError, match="exceed the static cache of 16"):
        StaticDecoder(tiny_llama, 16, compile=False).generate(tiny_calib[:1, :12], 8)
    with pytest.raises(LowbitError, match="positive number of tokens"):
        StaticDecoder(tiny_llama, 16, compile=False, prefill_chunk=0)
    with pytest.raises(LowbitError, match="one prompt at a time"):
        StaticDecoder(tiny_llama, 64, compile=False).generate(tiny_calib[:2, :4], 2)


@pytest.mark.skipif(not native.available(), reason="no compiler for lowbit's native kernels")
def test_native_linears_keep_names_tensors_and_outputs(tiny_llama, tiny_calib):
    keys = {k: v.data_ptr() for k, v in tiny_llama.state_dict().items()}
    ids = tiny_calib[:1, :6]
    with torch.no_grad():
        before = tiny_llama(ids).logits
        step_before = tiny_llama(ids[:, :1]).logits
    assert native_linears(tiny_llama) == 15  # 7 linears x 2 blocks + the head (tied to the embedding)
    assert all(type(m) is DecodeLinear for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear))
    assert {k: v.data_ptr() for k, v in tiny_llama.state_dict().items()} == keys
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight or not tiny_llama.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, before)  # 6 tokens: F.linear as before
        assert torch.allclose(tiny_llama(ids[:, :1]).logits, step_before, atol=1e-5)  # 1 token: native, measured 8.9e-8


def test_a_quantized_kv_cache_decodes_eagerly_with_its_own_cache(tiny_llama, tiny_calib):
    """KIVI-style 4-bit cache: the decoder keeps lowbit's cache (growing every step), so the step stays eager
    (compiling around it recompiled per layer and measured slower on the real model: 27.6 vs 35.8 tok/s)."""
    from lowbit.kvcache import new_kv_cache
    from lowbit.kvcache.config import as_kv_config

    tiny_llama.lowbit_kv_cache = "KIVI4"
    ids = tiny_calib[:1, :20]
    with torch.no_grad():
        cache = new_kv_cache(tiny_llama, as_kv_config("KIVI4"), ids)
        want = tiny_llama.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                                   past_key_values=cache)[0, 20:].tolist()
    dec = StaticDecoder(tiny_llama, 64, compile=True)
    assert not dec.compiled and "quantized KV cache" in dec.why_eager
    assert dec.generate(ids, 12).tokens == want
