"""compressed-tensors export: transformers loads it, lowbit loads it, sizes add up, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lowbit.errors import LowbitError
from lowbit.export.codes import CODES_FILE
from lowbit.export.compressed_tensors import export_compressed_tensors, load_compressed_tensors
from lowbit.packed import QuantLinear
from lowbit.quantization import quantize, save_quantized


def _recipe(method="gptq", bits=4, group=32, symmetric=True, **options):
    spec = {"type": "int", "bits": bits, "granularity": "group", "group_size": group,
            "symmetric": symmetric, "signed": symmetric}
    return {"name": f"t-{method}", "methods": [{"method": method, "spec": spec, "options": options}]}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True), (8, False)])
def test_transformers_and_lowbit_load_the_export(tiny_llama, tiny_calib, tmp_path, bits, symmetric):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    quantize(tiny_llama, _recipe("gptq", bits, 32, symmetric), tiny_calib, batch_size=4, progress=False)
    ref = _logits(tiny_llama, tiny_calib[:2])
    export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert (_logits(theirs, tiny_calib[:2]) - ref).abs().max().item() < 1e-5  # measured 0.0 for all four
    ours = load_compressed_tensors(tmp_path / "ct")
    assert isinstance(ours.model.layers[1].mlp.up_proj, QuantLinear)
    assert (_logits(ours, tiny_calib[:2]) - ref).abs().max().item() < 1e-5  # measured 0.0


def test_config_and_sizes_follow_the_bits_arithmetic(tiny_llama, tiny_calib, tmp_path):
    report = quantize(tiny_llama, _recipe("rtn", 4, 32, False), tiny_calib, progress=False)
    export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"]) == (4, 32, "group", False)
    stored = 0
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point"):
                stored += f.get_tensor(key).numel() * f.get_tensor(key).element_size()
    # 4-bit codes + fp32 scale + 4-bit zero per 32 weights: exactly the report's bits per weight
    assert stored * 8 == report.bits_per_weight * report.quantized_params


def test_mismatched_config_is_refused(tiny_llama, tiny_calib, tmp_path):
    quantize(tiny_llama, _recipe("rtn"), tiny_calib, progress=False)
    export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    cfg_path = tmp_path / "ct" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match=r"down_proj: weight_scale is \(64, 4\) but group size 16 .* disagree"):
        load_compressed_tensors(tmp_path / "ct")


def test_unexportable_layers_name_the_alternative(tiny_llama, tiny_calib, tmp_path):
    quantize(tiny_llama, _recipe("gptq", act_order=True, static_groups=False), tiny_calib, batch_size=4,
             progress=False)
    with pytest.raises(LowbitError, match="static_groups=true"):
        save_quantized(tiny_llama, None, None, tmp_path / "ct", format="compressed-tensors")
    out, fmt = save_quantized(tiny_llama, None, None, tmp_path / "auto")  # auto falls back, keeping the codes
    assert fmt == "fake-quant" and (out / CODES_FILE).is_file()
    assert not (tmp_path / "ct").exists()


def test_hqq_layers_fall_back_to_fake_quant(tiny_llama, tiny_calib, tmp_path):
    quantize(tiny_llama, _recipe("hqq", 4, 32, False), tiny_calib, progress=False)
    with pytest.raises(LowbitError, match="fractional.*can hold these weights: fake-quant.*gguf"):
        save_quantized(tiny_llama, None, None, tmp_path / "ct", format="compressed-tensors")
    out, fmt = save_quantized(tiny_llama, None, None, tmp_path / "fq")
    assert fmt == "fake-quant" and not (out / CODES_FILE).exists()


def test_interrupted_export_leaves_nothing(tiny_llama, tiny_calib, tmp_path, monkeypatch):
    import lowbit.export.compressed_tensors as ct

    quantize(tiny_llama, _recipe("rtn"), tiny_calib, progress=False)

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ct, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        export_compressed_tensors(tiny_llama, None, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_export_cli_round_trips_through_fake_quant(tiny_llama, tiny_calib, tmp_path, run_cli, clean_error):
    """quantize --out (auto: compressed-tensors) -> export fake-quant (+ codes) -> export compressed-tensors."""
    tiny_llama.save_pretrained(tmp_path / "fp")
    quantize(tiny_llama, _recipe("gptq", 4, 32, False), tiny_calib, batch_size=4, progress=False)
    ref = _logits(tiny_llama, tiny_calib[:2])
    save_quantized(tiny_llama, None, None, tmp_path / "q")
    code, out, err = run_cli("export", str(tmp_path / "q"), str(tmp_path / "fq"), "--format", "fake-quant")
    assert code == 0, err
    code, out, err = run_cli("export", str(tmp_path / "fq"), str(tmp_path / "ct"))
    assert code == 0, err
    assert "compressed-tensors" in out
    back = load_compressed_tensors(tmp_path / "ct")
    assert (_logits(back, tiny_calib[:2]) - ref).abs().max().item() < 1e-5
    code, _, err = run_cli("export", str(tmp_path / "fp"), str(tmp_path / "x"))
    clean_error(code, err, "no quantized layers")
    code, _, err = run_cli("export", str(tmp_path / "missing"), str(tmp_path / "x"))
    clean_error(code, err, "not a directory")
