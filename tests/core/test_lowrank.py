"""Low-rank factorization: ranks from budgets and spectra, SVD-LLM's truncation error equal to its dropped
singular values, activation-aware variants beating plain SVD on the output error, LoRC, and the recipe step."""

from __future__ import annotations

import pytest
import torch

from lowbit.core.lowrank import (asvd_factors, lorc_correction, rank_for_budget, rank_for_energy, svd_factors,
                                 svd_llm_factors)
from lowbit.errors import LowbitError
from lowbit.lowrank_layers import LowRankLinear
from lowbit.methods import get_method
from lowbit.quantization import quantize
from lowbit.spec import preset


def _problem(out=24, cols=32, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) * (4 * torch.rand(cols, generator=g) ** 3 + 0.05)  # unequal channels
    w = torch.randn(out, cols, generator=g)
    return w, x, x.T @ x


def test_ranks_from_budget_and_energy():
    assert rank_for_budget(576, 1536, 0.8) == int(0.8 * 576 * 1536 // (576 + 1536))
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 0.9) == 2 and rank_for_energy(s, 1.0) == 3


def test_plain_svd_is_the_best_weight_approximation():
    w, _, _ = _problem()
    f = svd_factors(w, rank=5)
    s = torch.linalg.svdvals(w.double())
    err = (w.double() - f.product().double()).pow(2).sum()
    assert err.item() == pytest.approx(s[5:].pow(2).sum().item(), rel=1e-5)  # Eckart-Young


def test_svd_llm_output_error_is_its_dropped_singular_values():
    w, x, gram = _problem()
    f = svd_llm_factors(w, gram, rank=6)
    out_err = (x.double() @ (w.double() - f.product().double()).T).pow(2).sum()
    assert out_err.item() == pytest.approx(f.singular[6:].double().pow(2).sum().item(), rel=1e-3)  # measured rel diff 5e-6


def test_activation_aware_beats_plain_svd_on_the_output():
    w, x, gram = _problem()
    err = lambda f: (x @ (w - f.product()).T).pow(2).mean().item()  # noqa: E731
    plain = err(svd_factors(w, rank=8))
    asvd = err(asvd_factors(w, x.abs().mean(0), rank=8))
    llm = err(svd_llm_factors(w, gram, rank=8))
    assert llm < asvd < plain  # measured 3.85 < 4.93 < 25.1
    assert llm < 0.5 * plain


def test_lorc_reduces_a_quantization_error():
    w, x, gram = _problem()
    wq = (w * 2).round() / 2  # a coarse grid
    f = lorc_correction(w, wq, rank=4, gram=gram)
    before = (x @ (w - wq).T).pow(2).mean().item()
    after = (x @ (w - wq - f.product()).T).pow(2).mean().item()
    assert after < 0.8 * before  # measured ratio 0.34


def test_recipe_step_counts_the_factors(tiny_llama, tiny_calib):
    report = quantize(tiny_llama, "lowrank80-svd-llm", tiny_calib, batch_size=4, progress=False)
    for layer in report.layers:
        out, cols = layer["shape"]
        rank = rank_for_budget(out, cols, 0.8)
        assert layer["bits_per_weight"] == pytest.approx(32 * rank * (out + cols) / (out * cols))
        assert "rank" in layer["note"]
    layer = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(layer, LowRankLinear) and layer.rank == rank_for_budget(64, 128, 0.8)
    assert layer.down.weight.shape == (layer.rank, 128) and layer.up.weight.shape == (64, layer.rank)


def test_factors_save_load_and_export_dense(tiny_llama, tiny_calib, tmp_path):
    """The checkpoint holds the two factors (smaller than dense), lowbit loads them back exactly, and the
    fake-quant export holds dense products that plain transformers loads with the same logits."""
    from transformers import AutoModelForCausalLM

    from lowbit.models.loading import load_model
    from lowbit.quantization import save_quantized

    report = quantize(tiny_llama, "lowrank80-svd-llm", tiny_calib, batch_size=4, progress=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    out, fmt = save_quantized(tiny_llama, None, report, tmp_path / "lr")
    assert fmt == "lowrank" and (out / "lowbit_lowrank.json").is_file()
    loaded, _ = load_model(out, require_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    dense, _ = save_quantized(loaded, None, None, tmp_path / "dense", "fake-quant")
    assert (out / "model.safetensors").stat().st_size < (dense / "model.safetensors").stat().st_size
    plain = AutoModelForCausalLM.from_pretrained(dense).eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ref, atol=1e-5)  # product vs two matmuls: measured ~1e-7


def test_nothing_rounds_after_a_factorization(tiny_llama, tiny_calib):
    recipe = {"name": "r", "methods": [{"method": "lowrank", "ignore": ["lm_head"]},
                                       {"method": "rtn", "spec": "W8", "ignore": ["lm_head"]}]}
    with pytest.raises(LowbitError, match="low-rank factors"):
        quantize(tiny_llama, recipe, tiny_calib, batch_size=4, progress=False)
    with pytest.raises(LowbitError, match="fraction"):
        get_method("lowrank", preset("W8"), {"fraction": 1.5})
