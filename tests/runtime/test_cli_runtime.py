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
    rows = {row["engine"]: row for row in r["rows"]}  # each measured in its own process
    assert set(rows) == {"lowbit-fast", "lowbit-eager"} and r["bits_per_weight"] > 4
    for row in rows.values():
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["time_to_first_token_ms"] > 0 and sum(row["kernels"].values()) == 14  # every packed linear
    assert rows["lowbit-fast"]["compile_s"] > 0 and rows["lowbit-eager"]["compile_s"] is None
    code, out, err = run_cli("generate", str(tmp_path / "q"), "Hello there", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.startswith("Hello there")
    code, _, err = run_cli("bench", str(tmp_path / "missing"))
    clean_error(code, err, "missing")
    code, _, err = run_cli("bench", str(tmp_path / "q"), "--engines", "lowbit-fast,vllm")
    clean_error(code, err, "unknown engine vllm", "choose from")
    code, _, err = run_cli("bench", str(tmp_path / "q"), "--engines", "llamacpp")
    clean_error(code, err, "needs --gguf FILE")
    code, _, err = run_cli("bench", str(tmp_path / "q"), "--engines", "onnxruntime", "--onnx", str(tmp_path / "x.onnx"))
    clean_error(code, err, "does not exist")
