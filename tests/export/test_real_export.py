"""The real model through compressed-tensors and GGUF, loaded back by plain transformers and by lowbit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.data import get_calibration
from lowbit.export.compressed_tensors import export_compressed_tensors
from lowbit.models.loading import load_model
from lowbit.quantization import quantize

pytestmark = pytest.mark.model


def test_checkpoint_loads_in_transformers_with_same_logits(smollm, tmp_path):
    """RTN W4 g64 (the GPTQ checkpoint of the same format is checked by benchmarks/export_roundtrip.py:
    GPTQ's sweep takes minutes, too long for the test run)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    base, tok = smollm
    model = copy.deepcopy(base)
    calib = get_calibration("wikitext2", tok, nsamples=4, seqlen=128, seed=0)
    report = quantize(model, "rtn-w4g64", calib, progress=False)
    ids = calib[:1]
    with torch.no_grad():
        ref = model(ids).logits
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = theirs(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= 1e-3, rel  # measured 0.0 (max abs 0.0): the same dequantized fp32 weights
    ours, tok2 = load_model(out)  # lowbit's own loader: packed QuantLinear layers, no fp32 copies
    with torch.no_grad():
        mine = ours(ids).logits
    # the packed layers pick dequant or int4 tinygemm by timing, so the rounding order varies by run:
    # measured max abs 9.5e-5 and 1.07e-4 on logits of size ~15, relative ~1e-6
    assert ((mine - ref).norm() / ref.norm()).item() <= 1e-4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    # size on disk = quantized linears at the report's bits per weight + every other tensor in fp32
    others = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("proj.weight"))
    expected = report.bits_per_weight * report.quantized_params / 8 + 4 * others
    size = (out / "model.safetensors").stat().st_size
    assert expected <= size <= expected * 1.001 + 200_000  # measured: header + weight_shape tensors only


def test_gguf_q4_0_export_keeps_the_codes(smollm, tmp_path, run_cli, clean_error):
    """RTN W4 g32 sym (fp16 scales) -> compressed-tensors dir -> `lowbit export --format gguf --type Q4_0`:
    transformers' GGUF reader gives the same logits and tokenizer as the in-memory model."""
    from lowbit.quantization import save_quantized

    base, tok = smollm
    model = copy.deepcopy(base)
    calib = get_calibration("wikitext2", tok, nsamples=4, seqlen=128, seed=0)
    spec = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True,
            "scale_dtype": "float16"}
    quantize(model, {"name": "q4", "methods": [{"method": "rtn", "spec": spec, "ignore": ["lm_head"]}]}, calib,
             progress=False)
    with torch.no_grad():
        ref = model(calib[:1]).logits
    save_quantized(model, tok, None, tmp_path / "ct")
    code, out, err = run_cli("export", str(tmp_path / "ct"), str(tmp_path / "m.gguf"), "--format", "gguf",
                             "--type", "Q4_0")
    assert code == 0, err
    assert "271 of 272" in out  # 210 linears + 61 norms kept; only the embedding is re-encoded (Q8_0)
    back, tok2 = load_model(tmp_path / "m.gguf")
    with torch.no_grad():
        got = back(calib[:1]).logits
    assert (got - ref).abs().max().item() < 1e-4  # measured 0.0: same codes, same fp16 scales, Q8_0 embedding
    assert tok2("Hello world, lowbit!").input_ids == tok("Hello world, lowbit!").input_ids
    code, _, err = run_cli("export", str(tmp_path / "ct"), str(tmp_path / "x.gguf"), "--format", "gguf",
                           "--type", "Q3_K_XL")
    clean_error(code, err, "unsupported GGUF type 'Q3_K_XL'", "Q4_0", "Q3_K_M")
    assert not (tmp_path / "x.gguf").exists()
