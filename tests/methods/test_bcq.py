"""Tests for lowbit.methods.bcq: Hessian-diagonal weighting against naive references, the method
end to end through the pipeline (weighted and data-free), its artifacts and its errors.

Every tolerance carries the value measured when it was set (torch 2.13 CPU).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.core.codebooks import dequantize_codebook, quantize_codebook, storage_bits_per_weight
from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.methods.base import LayerStats
from lowbit.methods.bcq import BCQ, DEAD_WEIGHT, bcq_column_weights
from lowbit.quantization import quantize as quantize_model
from lowbit.recipe import load_recipe
from lowbit.spec import QuantSpec


def bcq_spec(bits: int = 3, group: int | None = None, **kw) -> QuantSpec:
    gran = {"granularity": "group", "group_size": group} if group else {"granularity": "channel"}
    return QuantSpec(type="codebook", fmt="bcq", bits=bits, **gran, **kw)


def linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def problem(rows: int = 32, cols: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and inputs whose columns differ a lot in energy (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    col_scale = torch.exp(1.5 * torch.randn(cols, generator=g))
    x = torch.randn(512, cols, generator=g) * col_scale
    return w, x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ (w - wq).T).square().sum() / (x @ w.T).square().sum())


# ------------------------------------------------------------------------------------- weights
def test_column_weights_are_the_hessian_diagonal() -> None:
    h = torch.diag(torch.tensor([4.0, 1e-9, 2.0, 2.0])) + 0.5  # off-diagonal terms are ignored
    assert torch.equal(bcq_column_weights(h), h.diagonal())  # tiny but live columns keep their weight
    dead = torch.diag(torch.tensor([3.0, 0.0]))  # a column whose input is always 0
    assert torch.equal(bcq_column_weights(dead), torch.tensor([3.0, DEAD_WEIGHT * 1.5]))
    assert torch.equal(bcq_column_weights(torch.zeros(3, 3)), torch.ones(3))


def test_weighted_method_equals_codebook_fit_with_the_diagonal() -> None:
    w, x = problem()
    h = hessian(x)
    res = BCQ(spec=bcq_spec(3, 64)).quantize_layer("l", linear(w), LayerStats(nsamples=512, hessian=h))
    ref = quantize_codebook(w, bcq_spec(3, 64), weights=h.diagonal()[None, :], iters=10)
    assert torch.equal(res.weight, dequantize_codebook(ref))  # bit-exact


def _naive_weighted_alphas(x: torch.Tensor, planes: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Weighted least squares ``argmin_a sum_j wt_j (x_j - sum_i a_i B_ij)^2`` by explicit normal
    equations in float64 (one row)."""
    q = planes.shape[0]
    gram = torch.zeros(q, q, dtype=torch.float64)
    rhs = torch.zeros(q, dtype=torch.float64)
    for j in range(x.numel()):
        b = planes[:, j].double()
        gram += float(wt[j]) * torch.outer(b, b)
        rhs += float(wt[j]) * float(x[j]) * b
    return torch.linalg.lstsq(gram, rhs).solution


def test_fit_is_weighted_least_squares_with_nearest_planes() -> None:
    w, x = problem(rows=6, cols=64, seed=1)
    d = hessian(x).diagonal()
    res = BCQ(spec=bcq_spec(3), iters=60).quantize_layer("l", linear(w), LayerStats(hessian=hessian(x)))
    alphas, planes = res.artifacts["alphas"], res.artifacts["planes"]
    assert planes.shape == (3, 6, 64) and planes.dtype == torch.int8
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))  # all 8 sign patterns
    for r in range(6):
        ref = _naive_weighted_alphas(w[r], planes[:, r], d)
        # float32 Gram products of weights spanning ~e^9: measured max rel diff 2.0e-4 (abs 1.0e-6)
        assert torch.allclose(alphas[r].double(), ref, rtol=1e-3, atol=1e-7)
        # every weight takes the nearest of the 2^q values sum_i alpha_i b_i
        values = combos @ alphas[r]
        chosen = (planes[:, r].float() * alphas[r][:, None]).sum(0)
        best = (w[r][:, None] - values[None, :]).abs().min(1).values
        assert torch.allclose((w[r] - chosen).abs(), best, atol=1e-7)
        assert torch.allclose(chosen, res.weight[r], atol=1e-7)


def test_weighted_beats_unweighted_on_output_error() -> None:
    # measured output error: weighted 0.0128 vs unweighted 0.0435 (ratio 0.295); weight error
    # 0.370 vs 0.240 (sums of squares).  Real smollm2-135m, 3 bit g64 fp16 alphas, wikitext2
    # calibration: mean layer output error 0.0218 weighted vs 0.0415 unweighted (lower on 210/210
    # layers), 2-window perplexity 35.8 vs 456 (fp 18.84)
    w, x = problem(64, 256, 2)
    stats = LayerStats(nsamples=512, hessian=hessian(x))
    weighted = BCQ(spec=bcq_spec(3)).quantize_layer("l", linear(w), stats).weight
    plain = BCQ(spec=bcq_spec(3), hessian_weighted=False).quantize_layer("l", linear(w), LayerStats()).weight
    assert out_err(x, w, weighted) < 0.85 * out_err(x, w, plain)
    # ... and pays for it in plain weight error, as it should
    assert float((w - weighted).square().sum()) > float((w - plain).square().sum())


# ------------------------------------------------------------------------------------- method / pipeline
def test_needs_hessian_follows_the_option() -> None:
    assert BCQ(spec=bcq_spec()).needs_hessian is True
    assert BCQ(spec=bcq_spec(), hessian_weighted=False).needs_hessian is False
    assert BCQ.options() == ["lorc_rank", "iters", "hessian_weighted"]  # lorc_rank: every rounding step's


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("group", [None, 32])
def test_end_to_end_on_tiny_llama(tiny_llama, tiny_calib, weighted: bool, group: int | None) -> None:
    spec = {"type": "codebook", "fmt": "bcq", "bits": 3, "granularity": "group" if group else "channel"}
    if group:
        spec["group_size"] = group
    w0 = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules()
          if isinstance(m, torch.nn.Linear) and "layers." in n}
    recipe = {"name": "x", "methods": [{"method": "bcq", "spec": spec, "options": {"hessian_weighted": weighted}}]}
    rep = quantize_model(tiny_llama, recipe, tiny_calib, progress=False)
    assert len(rep.layers) == 14
    for layer in rep.layers:
        mod = tiny_llama.get_submodule(layer["name"])
        arts = mod.quantized.details
        qt = arts["quantized"]
        assert layer["bits_per_weight"] == storage_bits_per_weight(qt)
        cols = layer["shape"][1]
        assert layer["bits_per_weight"] == pytest.approx(3 + 3 * 32 / (group or cols))
        # LUT-GEMM form: sum_i alpha_i B_i, group by group, is the new weight
        recon = (arts["planes"].float() * arts["alphas"].float().T[:, :, None]).sum(0)
        assert torch.allclose(recon.reshape(mod.weight.shape), mod.weight.data, atol=1e-6)
        assert layer["output_error"] is not None and layer["weight_error"] < 0.1  # measured max 0.037
        if not weighted:  # data-free: the plain codebook fit
            ref = quantize_codebook(w0[layer["name"]], QuantSpec.from_dict(spec), iters=10)
            assert torch.equal(mod.weight.data, dequantize_codebook(ref))
    assert torch.isfinite(tiny_llama(tiny_calib[:1]).logits).all()


def test_fp16_alphas_are_stored_and_counted() -> None:
    w, x = problem(16, 128, 3)
    res = BCQ(spec=bcq_spec(3, 128, scale_dtype="float16")).quantize_layer(
        "l", linear(w), LayerStats(hessian=hessian(x)))
    assert res.artifacts["alphas"].dtype == torch.float16
    assert res.bits_per_weight == pytest.approx(3 + 3 * 16 / 128)


def test_weighted_without_calibration_is_a_clear_error() -> None:
    with pytest.raises(LowbitError, match="calibration inputs"):
        BCQ(spec=bcq_spec()).quantize_layer("blk.q", linear(torch.randn(4, 64)), LayerStats())


@pytest.mark.parametrize("spec, options, match", [
    (QuantSpec(type="int", bits=3, granularity="channel"), {}, "fmt: bcq"),
    (QuantSpec(type="codebook", fmt="kmeans", bits=3, granularity="channel"), {}, "fmt: bcq"),
    (QuantSpec(type="codebook", fmt="bcq", bits=3, granularity="tensor"), {}, "granularity"),
    (QuantSpec(type="codebook", fmt="bcq", bits=3, granularity="block", block=(4, 4)), {}, "granularity"),
    (bcq_spec(), {"iters": -1}, "iters"),
    (bcq_spec(), {"iters": True}, "iters"),
    (bcq_spec(), {"hessian_weighted": "yes"}, "hessian_weighted"),
    (bcq_spec(), {"damp": 0.1}, "no option"),
])
def test_bad_options_raise_lowbit_error(spec: QuantSpec, options: dict, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        get_method("bcq", spec, options)


def test_bad_recipe_fails_before_work(tiny_llama, tiny_calib) -> None:
    recipe = {"name": "x", "methods": [{"method": "bcq", "spec": "W4_G64"}]}
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(LowbitError, match="fmt: bcq"):
        quantize_model(tiny_llama, recipe, tiny_calib, progress=False)
    assert torch.equal(w, tiny_llama.model.layers[0].self_attn.q_proj.weight)


def test_shipped_recipe() -> None:
    (entry,) = load_recipe("bcq-3bit").entries
    assert entry.method == "bcq" and entry.spec.fmt == "bcq" and entry.spec.bits == 3
    assert entry.spec.group_size == 64 and entry.spec.scale_dtype == "float16"  # 64 divides smollm2's 576 / 1536
    assert entry.options == {"iters": 10, "hessian_weighted": True}
    method = get_method(entry.method, entry.spec, entry.options)
    assert method.needs_hessian is True
