"""The input embedding and the output head quantized on request: named by a recipe entry with a data-free step,
rounded before the blocks, tied weights kept tied, and carried by fake-quant and compressed-tensors checkpoints."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError

pytestmark = pytest.mark.usefixtures("one_thread")

INT8_ROWS = {"type": "int", "bits": 8, "granularity": "channel", "symmetric": True}
W4 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True}


def _recipe(*entries) -> dict:
    return {"name": "outer", "methods": list(entries)}


def _ids(tiny) -> torch.Tensor:
    return torch.randint(0, tiny.vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _on_int8_rows(w: torch.Tensor) -> bool:
    """Every row is a multiple of its own max/127 (symmetric int8 per row)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    codes = w / scale
    return bool(((codes - codes.round()).abs() < 1e-3).all())


def test_a_tied_embedding_is_quantized_once_for_both_uses(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    model, tok = load_model(tiny.save("qwen2", tmp_path / "fp"))  # qwen2's tiny config ties the head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids(tiny)
    report = quantize(model, _recipe({"method": "rtn", "spec": INT8_ROWS, "targets": ["embed_tokens"]},
                                     {"method": "rtn", "spec": W4}), ids, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    assert _on_int8_rows(model.model.embed_tokens.weight.data)
    first = report.layers[0]
    assert first["name"] == "model.embed_tokens" and first["bits_per_weight"] == pytest.approx(8 + 32 / 64)
    ref = _logits(model, ids)
    ct, fmt = save_quantized(model, tok, report, tmp_path / "ct")
    assert fmt == "compressed-tensors"
    back, _ = load_model(ct)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert (_logits(back, ids) - ref).abs().max().item() <= 1e-5  # measured 0.0
    fake, _ = save_quantized(model, tok, report, tmp_path / "fake", "fake-quant")
    plain = AutoModelForCausalLM.from_pretrained(fake)
    assert (_logits(plain, ids) - ref).abs().max().item() <= 1e-5  # measured 0.0


def test_an_untied_head_and_embedding_are_packed(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.models.loading import load_model
    from lowbit.packed.qlinear import QuantLinear
    from lowbit.quantization import quantize, save_quantized

    ids = _ids(tiny)
    head_only = _recipe({"method": "rtn", "spec": W4, "targets": ["lm_head"]})
    both = _recipe({"method": "rtn", "spec": W4, "targets": ["lm_head"]},
                   {"method": "rtn", "spec": INT8_ROWS, "targets": ["embed_tokens"]})
    for name, recipe in (("head", head_only), ("both", both)):
        model, tok = load_model(tiny.save("llama", tmp_path / name / "fp"))
        report = quantize(model, recipe, ids, progress=False)
        assert {l["name"] for l in report.layers} <= {"lm_head", "model.embed_tokens"}  # the blocks untouched
        ref = _logits(model, ids)
        with pytest.warns(UserWarning, match="embedding") if name == "both" else _nothing():
            ct, _ = save_quantized(model, tok, report, tmp_path / name / "ct", "compressed-tensors")
        back, _ = load_model(ct)
        assert isinstance(back.lm_head, QuantLinear)
        assert (_logits(back, ids) - ref).abs().max().item() <= 1e-5  # measured 0.0
        if name == "head":  # transformers' own compressed-tensors loader reads a packed head
            theirs = AutoModelForCausalLM.from_pretrained(ct)
            assert (_logits(theirs, ids) - ref).abs().max().item() <= 1e-4  # measured 0.0


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_what_outer_targets_refuse(tiny, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, _ = load_model(tiny.save("qwen2", tmp_path / "fp"))
    ids = _ids(tiny)
    with pytest.raises(LowbitError, match="only a rounding step that needs no calibration data"):
        quantize(model, _recipe({"method": "gptq", "spec": W4, "targets": ["lm_head"]}), ids, progress=False)
    with pytest.raises(LowbitError, match="named by two recipe entries"):  # tied: one tensor, one step
        quantize(model, _recipe({"method": "rtn", "spec": W4, "targets": ["lm_head"]},
                                {"method": "rtn", "spec": INT8_ROWS, "targets": ["embed_tokens"]}), ids,
                 progress=False)
    # "Linear" keeps meaning the blocks' linears: a recipe without ignore does not reach the head
    report = quantize(model, _recipe({"method": "rtn", "spec": W4, "ignore": []}), ids, progress=False)
    assert all(l["name"].startswith("model.layers.") for l in report.layers)


def test_a_streamed_run_refuses_outer_targets(tiny, tmp_path):
    from lowbit.stream.run import quantize_streamed

    src = tiny.save("llama", tmp_path / "fp")
    with pytest.raises(LowbitError, match="embedding or the head"):
        quantize_streamed(str(src), _recipe({"method": "rtn", "spec": INT8_ROWS, "targets": ["embed_tokens"]}),
                          _ids(tiny), tmp_path / "out", progress=False)
