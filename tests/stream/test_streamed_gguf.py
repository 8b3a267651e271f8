"""Streaming straight from a GGUF file: each tensor dequantized when its block is loaded gives the bytes and the
perplexity of loading the whole GGUF in memory first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GPTQ = {"name": "g", "methods": [{"method": "gptq", "ignore": ["lm_head"],
                                  "spec": {"type": "int", "bits": 4, "granularity": "group", "group_size": 32,
                                           "symmetric": True, "signed": True}}]}


@pytest.fixture(scope="module")
def gguf_file(small_model_dir, tmp_path_factory) -> Path:
    """The small Llama as a Q4_1 GGUF (embedding Q8_0), as the smollm2 alias ships."""
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    model, tok = load_model(small_model_dir)
    out = tmp_path_factory.mktemp("gguf") / "small.gguf"
    export_gguf(model, tok, out, "Q4_1", "Q8_0")
    return out


@pytest.fixture(scope="module")
def gguf_loaded(gguf_file):
    """(model, tokenizer) of the GGUF loaded whole by transformers' GGUF loader (once: it converts the vocabulary)."""
    from lowbit.models.loading import load_model

    return load_model(gguf_file)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fake-quant"])
def test_streamed_from_gguf_writes_the_in_memory_bytes(gguf_file, gguf_loaded, tmp_path, fmt):
    import copy

    from lowbit.quantization import quantize, save_quantized
    from lowbit.stream.run import quantize_streamed

    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    model, tok = copy.deepcopy(gguf_loaded[0]), gguf_loaded[1]
    report = quantize(model, GPTQ, calib, batch_size=2, progress=False)
    mem, _ = save_quantized(model, tok, report, tmp_path / "mem", fmt)
    _, written = quantize_streamed(str(gguf_file), GPTQ, calib, tmp_path / "st", tok, fmt=fmt, batch_size=2,
                                   progress=False)
    assert written == fmt
    assert (mem / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()


def test_streamed_perplexity_of_a_gguf_equals_the_in_memory_one(gguf_file, gguf_loaded, data_dir):
    from lowbit.eval.perplexity import evaluate
    from lowbit.stream.evaluate import evaluate_streamed

    model, tok = gguf_loaded
    ref = evaluate(model, tok, "wikitext2", "test", seqlen=128, max_windows=2, data_dir=str(data_dir))
    got = evaluate_streamed(str(gguf_file), tok, "wikitext2", "test", seqlen=128, max_windows=2,
                            data_dir=str(data_dir))
    assert got.tokens == ref.tokens
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)  # same dequantized weights, sliced softmax
