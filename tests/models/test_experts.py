"""MoE experts as one linear per expert: the same outputs as transformers' fused experts, each expert calibrated on
the tokens routed to it, experts no token reached reported, and every checkpoint path (fake-quant in plain
transformers, compressed-tensors in lowbit, streamed) holding the same weights."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.errors import LowbitError

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
GPTQ = {"name": "g", "methods": [{"method": "gptq", "ignore": ["lm_head"],
                                  "spec": {"type": "int", "bits": 4, "granularity": "group", "group_size": 32,
                                           "symmetric": True, "signed": True}}]}


def _ids(tiny, n: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, tiny.vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _experts(model):
    return model.model.layers[0].mlp.experts


@pytest.mark.parametrize("family", MOE)
def test_unfused_experts_compute_what_the_fused_ones_do(family, tiny, tmp_path):
    from lowbit.experts import ExpertLinears, fuse_experts, unfuse_experts
    from lowbit.models.loading import load_model

    model, _ = load_model(tiny.save(family, tmp_path / "fp"))
    ids = _ids(tiny)
    fused_type = type(_experts(model))
    ref = _logits(model, ids)
    names = unfuse_experts(model)
    assert len(names) == model.config.num_hidden_layers and isinstance(_experts(model), ExpertLinears)
    assert (_logits(model, ids) - ref).abs().max().item() <= 1e-6  # measured 0.0: the same matmuls per expert
    assert "model.layers.0.mlp.experts.3.down_proj" in dict(model.named_modules())
    fuse_experts(model)
    assert type(_experts(model)) is fused_type
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gptq_calibrates_each_expert_and_every_checkpoint_keeps_it(family, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    model, tok = load_model(tiny.save(family, tmp_path / "fp"))
    ids = _ids(tiny)
    report = quantize(model, GPTQ, ids, batch_size=2, progress=False)
    assert "full_precision_experts" not in report.extra
    experts = report.extra["experts"]
    per_block = {}
    for name, n in experts["tokens"].items():
        per_block[name.split(".mlp.")[0]] = per_block.get(name.split(".mlp.")[0], 0) + n
    top_k = model.config.num_experts_per_tok
    assert set(per_block.values()) == {ids.numel() * top_k}  # every routed token counted once per chosen expert
    assert {l["name"] for l in report.layers} >= {f"model.layers.1.mlp.experts.{e}.{p}" for e in range(4)
                                                   for p in ("gate_proj", "up_proj", "down_proj")}
    q = _logits(model, ids)
    fake, _ = save_quantized(model, tok, report, tmp_path / "fake", "fake-quant")
    plain = AutoModelForCausalLM.from_pretrained(fake)  # transformers' own layout: experts fused on load
    assert (_logits(plain, ids) - q).abs().max().item() <= 1e-5  # measured 0.0
    ct, _ = save_quantized(model, tok, report, tmp_path / "ct", "compressed-tensors")
    back, _ = load_model(ct)
    assert (_logits(back, ids) - q).abs().max().item() <= 1e-5  # measured 0.0: one packed linear per expert


def test_an_expert_no_token_reaches_falls_back_and_is_reported(tiny, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, _ = load_model(tiny.save("mixtral", tmp_path / "fp"))

    def never_expert_3(module, args, out):
        logits, weights, index = out
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_expert_3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = quantize(model, GPTQ, _ids(tiny), batch_size=2, progress=False)
    unrouted = report.extra["experts"]["unrouted"]
    assert unrouted == ["model.layers.0.mlp.experts.3", "model.layers.1.mlp.experts.3"]
    notes = {l["name"]: l["note"] for l in report.layers}
    assert "RTN" in notes["model.layers.0.mlp.experts.3.up_proj"]
    assert notes["model.layers.0.mlp.experts.2.up_proj"] is None
    assert any("2 of 8 experts got no calibration token" in str(w.message) for w in caught)


def test_a_refused_recipe_leaves_the_experts_fused(tiny, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, _ = load_model(tiny.save("mixtral", tmp_path / "fp"))
    fused_type = type(_experts(model))
    with pytest.raises(LowbitError, match="calibration"):
        quantize(model, GPTQ, torch.zeros(0, 8, dtype=torch.long), progress=False)
    assert type(_experts(model)) is fused_type and "model.layers.0.mlp.experts.gate_up_proj" in dict(
        model.named_parameters())


def test_checkpoint_names_follow_transformers_renamings(tiny, tmp_path):
    """Mixtral's checkpoints say block_sparse_moe and w1 / w3 / w2 where transformers 5 builds mlp and fused
    experts: a streamed run finds each per-expert linear under its name on disk."""
    from lowbit.models.loading import load_config, resolve_model
    from lowbit.checkpoint_names import checkpoint_names
    from lowbit.stream.weights import meta_model

    model = meta_model(load_config(resolve_model(str(tiny.save("mixtral", tmp_path / "m")))), torch.float32)
    names = checkpoint_names(model)
    assert names("model.layers.0.mlp.experts.3.up_proj.weight")[0] == \
        "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    assert names("model.layers.0.mlp.experts.3.down_proj.weight")[0] == \
        "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert names("model.layers.0.mlp.gate.weight") == ["model.layers.0.block_sparse_moe.gate.weight"]
    assert names("model.layers.0.self_attn.q_proj.weight") == []


@pytest.mark.parametrize("fmt", ["fake-quant", "compressed-tensors"])
def test_streamed_moe_writes_the_in_memory_tensors(fmt, tiny, tmp_path):
    from safetensors.torch import load_file

    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized
    from lowbit.stream.run import quantize_streamed

    src = tiny.save("mixtral", tmp_path / "fp")
    ids = _ids(tiny)
    model, tok = load_model(src)
    report = quantize(model, GPTQ, ids, batch_size=2, progress=False)
    mem, _ = save_quantized(model, tok, report, tmp_path / "mem", fmt)
    streamed, written = quantize_streamed(str(src), GPTQ, ids, tmp_path / "st", tok, fmt=fmt, batch_size=2,
                                          progress=False)
    assert written == fmt and streamed.extra["experts"]["tokens"] == report.extra["experts"]["tokens"]
    a, b = load_file(mem / "model.safetensors"), load_file(tmp_path / "st" / "model.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
