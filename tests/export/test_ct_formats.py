"""compressed-tensors W8A8 / W4A8 (int-quantized), FP8 (float-quantized) and NVFP4 exports, with
activation quantization: plain transformers + compressed-tensors and lowbit's loader both reproduce
lowbit's in-memory logits."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.activations import input_quantizers
from lowbit.activations.io import ACTIVATIONS_FILE
from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import export_compressed_tensors, load_compressed_tensors
from lowbit.models.loading import load_model
from lowbit.quantization import quantize, save_quantized

W8 = {"type": "int", "bits": 8, "granularity": "channel"}
W4 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32}
FP8 = "FP8_E4M3"
A8 = "A8_TOKEN"
A8_STATIC = {"type": "int", "bits": 8, "granularity": "tensor"}
FP8_TOKEN = "FP8_E4M3_TOKEN"


def _recipe(spec, act=None, method="rtn"):
    entry = {"method": method, "spec": spec}
    if act is not None:
        entry["activations"] = act
    return {"name": "t", "methods": [entry]}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


CASES = {  # label: (weight spec, activation spec, compressed-tensors format)
    "w8a8-dynamic": (W8, A8, "int-quantized"),
    "w8a8-static": (W8, A8_STATIC, "int-quantized"),
    "w4a8": (W4, A8, "int-quantized"),
    "fp8-dynamic": (FP8, FP8_TOKEN, "float-quantized"),
    "fp8-weights": (FP8, None, "float-quantized"),
}


@pytest.mark.parametrize("label", sorted(CASES))
def test_transformers_and_lowbit_reproduce_the_logits(tiny_llama, tiny_calib, tmp_path, label):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    spec, act, fmt = CASES[label]
    quantize(tiny_llama, _recipe(spec, act), tiny_calib, progress=False)
    ref = _logits(tiny_llama, tiny_calib[:2])
    export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt
    assert (qc["config_groups"]["group_0"]["input_activations"] is None) == (act is None)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert (_logits(theirs, tiny_calib[:2]) - ref).abs().max().item() < 1e-5  # measured 0.0 for every case
    ours = load_compressed_tensors(tmp_path / "ct")
    assert len(input_quantizers(ours)) == (14 if act else 0)
    got = _logits(ours, tiny_calib[:2])
    # 0.0 where lowbit runs the dequantized weights; for W8A8 dynamic its packed layers may pick the integer
    # kernel (torch._int_mm) by timing, whose fp32 rescaling flips an input code now and then: relative 5.8e-4
    assert ((got - ref).norm() / ref.norm()).item() < 5e-3


def test_activation_quantization_is_really_applied(tiny_llama, tiny_calib):
    fp = _logits(tiny_llama, tiny_calib[:2])
    quantize(tiny_llama, _recipe({"type": "int", "bits": 8, "granularity": "channel"},
                                 {"type": "int", "bits": 4, "granularity": "token", "dynamic": True}), tiny_calib,
             progress=False)
    with_inputs = _logits(tiny_llama, tiny_calib[:2])
    from lowbit.activations import detach_input_quantizers
    detach_input_quantizers(tiny_llama)
    weights_only = _logits(tiny_llama, tiny_calib[:2])
    # 4-bit inputs move the logits far more than 8-bit weights: measured 0.080 vs 0.0062
    assert (with_inputs - fp).abs().max() > 5 * (weights_only - fp).abs().max()


def test_nvfp4_loads_in_bf16(tiny_llama, tiny_calib, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    quantize(tiny_llama, _recipe("NVFP4"), tiny_calib, progress=False)
    ref = _logits(tiny_llama, tiny_calib[:2])
    export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "nvfp4-pack-quantized" and cfg["dtype"] == "bfloat16"
    ours32 = load_compressed_tensors(tmp_path / "ct")
    assert (_logits(ours32, tiny_calib[:2]) - ref).abs().max().item() < 1e-5  # measured 2.1e-7 (1/global rounding)
    # compressed-tensors 0.20 decompresses NVFP4 to bf16 only: compare at bf16
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ours16 = load_compressed_tensors(tmp_path / "ct", dtype=torch.bfloat16)
    assert (_logits(theirs, tiny_calib[:2]) - _logits(ours16, tiny_calib[:2])).abs().max().item() == 0.0  # measured 0.0


def test_fake_quant_keeps_the_activation_quantizers(tiny_llama, tiny_calib, tmp_path):
    quantize(tiny_llama, _recipe(W8, A8_STATIC), tiny_calib, progress=False)
    ref = _logits(tiny_llama, tiny_calib[:2])
    out, fmt = save_quantized(tiny_llama, None, None, tmp_path / "fq", format="fake-quant")
    assert (out / ACTIVATIONS_FILE).is_file()
    back, _ = load_model(out, require_tokenizer=False)
    assert len(input_quantizers(back)) == 14
    assert (_logits(back, tiny_calib[:2]) - ref).abs().max().item() < 1e-5  # measured 0.0


def test_dynamic_int_inputs_need_the_compressed_tensors_grid(tiny_llama, tiny_calib, tmp_path):
    quantize(tiny_llama, _recipe(W8, {"type": "int", "bits": 8, "granularity": "token", "dynamic": True}),
             tiny_calib, progress=False)
    with pytest.raises(LowbitError, match="full_range: true"):
        save_quantized(tiny_llama, None, None, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_float8_weight_with_wrong_dtype_is_refused(tiny_llama, tiny_calib, tmp_path):
    from safetensors.torch import load_file, save_file

    quantize(tiny_llama, _recipe(FP8, FP8_TOKEN), tiny_calib, progress=False)
    export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    f = tmp_path / "ct" / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].float()
    save_file(t, str(f))
    with pytest.raises(LowbitError, match="up_proj: a float-quantized layer needs a float8_e4m3fn 'weight'"):
        load_compressed_tensors(tmp_path / "ct")
