"""Trained models export like post-training ones (issue 18): a QAT W4 model as compressed-tensors loads in
plain transformers with equal logits; a QAT Q4_0 model's GGUF keeps its trained codes and runs in lowbit
(and in llama.cpp where the ``llamacpp`` extra is installed).  Here beside the tiny checkpoints with a
tokenizer, which GGUF files carry."""

from __future__ import annotations

import pytest
import torch

from lowbit.models.loading import load_model
from lowbit.quantization import quantize
from lowbit.quantized_layers import quantized_weight


def _trained(tiny, tmp_path, spec: dict):
    model, tok = load_model(tiny.save("llama", tmp_path / "hf"))
    calib = torch.randint(0, tiny.vocab, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"name": "qat", "methods": [{"method": "qat-block", "spec": spec, "ignore": ["lm_head"],
                                          "options": {"epochs": 2}}]}
    report = quantize(model, recipe, calib, batch_size=4, progress=False)
    assert [r["steps"] for r in report.extra["methods"]["qat-block"]] == [4, 4]  # 2 epochs of 2 batches a block
    assert quantized_weight(model.model.layers[1].mlp.down_proj).method == "qat-block"
    return model, tok, calib[:2]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_qat_w4_compressed_tensors_loads_in_plain_transformers(tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import export_compressed_tensors

    model, tok, ids = _trained(tiny, tmp_path, {"type": "int", "bits": 4, "granularity": "group", "group_size": 32,
                                                "symmetric": False})
    export_compressed_tensors(model, tok, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert (_logits(theirs, ids) - _logits(model, ids)).abs().max().item() < 1e-5  # measured 0.0


def _q4_0_model(tiny, tmp_path):
    spec = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "scale_dtype": "float16"}
    model, tok, ids = _trained(tiny, tmp_path, spec)
    from lowbit.export.gguf import export_gguf

    report = export_gguf(model, tok, tmp_path / "qat.gguf", "Q4_0", "F32")
    return model, ids, report


def test_qat_q4_0_gguf_keeps_the_trained_codes_and_runs(tiny, tmp_path):
    model, ids, report = _q4_0_model(tiny, tmp_path)
    blocks = [r for r in report.tensors if r.type == "Q4_0"]
    assert len(blocks) == 14 and all(r.exact and r.rel_error == 0.0 for r in blocks)  # fp16 scales trained as such
    loaded, _ = load_model(tmp_path / "qat.gguf")
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max().item() < 1e-4  # measured ~1e-6 (f32 head)


def test_qat_q4_0_gguf_runs_in_llama_cpp(tiny, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, ids, _ = _q4_0_model(tiny, tmp_path)
    llm = llama_cpp.Llama(str(tmp_path / "qat.gguf"), logits_all=True, verbose=False, n_ctx=64)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(llm.scores[: ids.shape[1]])
    ours = _logits(model, ids[:1])[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9  # llama.cpp multiplies with Q8_0 activations
