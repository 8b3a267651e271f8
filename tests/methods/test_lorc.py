"""LoRC as an option of any rounding step (``lorc_rank``): the factors are the truncated SVD of the rounding error
(whitened where the step has a Hessian), counted in the bits, kept through save / load / plain transformers, and
bad combinations refused before work."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.lorc import lorc_factors
from lowbit.quantization import quantize


def _recipe(method: str, rank: int, spec: str = "W3_G64", **options) -> dict:
    return {"name": "r", "methods": [{"method": method, "spec": spec, "ignore": ["lm_head"],
                                      "options": {"lorc_rank": rank, **options}}]}


def test_unwhitened_factors_are_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    wq = (w * 2).round() / 2
    a, b = lorc_factors(w, wq, 4)
    assert a.dtype == b.dtype == torch.float16 and a.shape == (48, 4) and b.shape == (4, 32)
    u, s, vh = torch.linalg.svd((w - wq).double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(a.double() @ b.double(), best, atol=2e-3)  # fp16 factors: measured 1.2e-4
    rest = ((w - wq).double() - a.double() @ b.double()).pow(2).sum()
    assert rest.item() == pytest.approx(s[4:].pow(2).sum().item(), rel=1e-3)  # Eckart-Young; measured 2e-6


def test_gptq_with_lorc_counts_the_factors_and_cuts_the_error(tiny_llama, tiny_calib):
    import copy

    base = quantize(copy.deepcopy(tiny_llama), _recipe("gptq", 0), tiny_calib, batch_size=4, progress=False)
    lorc = quantize(tiny_llama, _recipe("gptq", 8), tiny_calib, batch_size=4, progress=False)
    for b, l in zip(base.layers, lorc.layers):
        out, cols = l["shape"]
        assert l["bits_per_weight"] == pytest.approx(b["bits_per_weight"] + 16 * 8 * (out + cols) / (out * cols))
        assert l["extra_params"] == b["extra_params"] + 8 * (out + cols)
    err = lambda r: sum(x["output_error"] for x in r.layers)  # noqa: E731
    assert err(lorc) < 0.8 * err(base)  # measured ratio 0.59 on the tiny model
    q = tiny_llama.model.layers[0].self_attn.q_proj.quantized
    assert q.form is None and "LoRC" in q.int_refusal and q.details["lorc"][0].shape == (64, 8)


def test_lorc_model_saves_as_fake_quant_that_transformers_loads(tiny_llama, tiny_calib, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.quantization import save_quantized

    report = quantize(tiny_llama, _recipe("rtn", 4), tiny_calib, batch_size=4, progress=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    with pytest.raises(LowbitError, match="LoRC"):
        save_quantized(tiny_llama, None, report, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    out, fmt = save_quantized(tiny_llama, None, report, tmp_path / "fq")
    assert fmt == "fake-quant"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ref)


@pytest.mark.parametrize("recipe, message", [
    (_recipe("rtn", 65), "above min"),
    (_recipe("wanda", 4, spec="W8"), "does not round"),
    ({"name": "r", "methods": [{"method": "magnitude", "ignore": ["lm_head"], "options": {"sparsity": 0.5}},
                               {"method": "gptq", "spec": "W4_G32", "ignore": ["lm_head"],
                                "options": {"lorc_rank": 4}}]}, "refill"),
    ({"name": "r", "methods": [{"method": "rtn", "spec": "W4_G32", "ignore": ["lm_head"],
                                "options": {"lorc_rank": -1}}]}, "lorc_rank"),
])
def test_bad_lorc_is_refused_before_work(tiny_llama, tiny_calib, recipe, message):
    before = tiny_llama.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(LowbitError, match=message):
        quantize(tiny_llama, recipe, tiny_calib, batch_size=4, progress=False)
    assert torch.equal(tiny_llama.model.layers[0].mlp.up_proj.weight, before)
