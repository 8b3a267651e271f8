"""`lowbit generate` and `lowbit bench` end to end on a small Llama carrying the real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.model


@pytest.fixture()
def small_dir(smollm, tmp_path):
    """A 2-block Llama (hidden 64) with smollm2's vocabulary and tokenizer, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    return tmp_path / "small"


def test_quantize_then_bench_and_generate(small_dir, tmp_path, run_cli, clean_error):
    code, _, err = run_cli("quantize", str(small_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                           "--nsamples", "4", "--seqlen", "64", "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    code, out, err = run_cli("bench", str(tmp_path / "q"), "--prompt-tokens", "16", "--new-tokens", "4",
                             "--repeats", "1", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert sum(r["kernels"].values()) == 14  # every packed linear chose a kernel by timing
    code, out, err = run_cli("generate", str(tmp_path / "q"), "Hello there", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.startswith("Hello there")
    code, _, err = run_cli("bench", str(tmp_path / "missing"))
    clean_error(code, err, "missing")
