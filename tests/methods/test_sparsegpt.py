"""SparseGPT: the lazy-batched sweep against a naive per-column OBS loop, exact sparsity and N:M patterns,
joint quantization on the grid, kept masks, and reconstruction beating magnitude pruning."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.methods.sparsegpt import sparsegpt_prune
from lowbit.methods.statistics import LayerStats
from lowbit.quantization import quantize
from lowbit.spec import preset


def _problem(out: int = 8, cols: int = 32, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, correlated inputs ``X`` with channels of unequal loudness (as in LLMs) and ``H = 2/n X^T X``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ mix * (3 * torch.rand(cols, generator=g) + 0.1)
    w = torch.randn(out, cols, generator=g)
    return w, x, 2 / n * x.T @ x


def _naive(w: torch.Tensor, h: torch.Tensor, sparsity: float, mask_block: int, pattern=None, damp=0.01):
    """The paper's algorithm without lazy updates: each column's error goes straight into every later one."""
    w = w.clone().double()
    h = h.double() + damp * torch.diag(h).mean().double() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i in range(cols):
        if pattern is None and i % mask_block == 0:
            blk = slice(i, min(i + mask_block, cols))
            score = (w[:, blk] ** 2 / torch.diag(u)[blk] ** 2).flatten()
            k = int(round(sparsity * score.numel()))
            chosen = torch.zeros_like(score, dtype=torch.bool)
            chosen[score.argsort()[:k]] = True
            mask[:, blk] = chosen.reshape(w.shape[0], -1)
        if pattern is not None and i % pattern[1] == 0:
            blk = slice(i, i + pattern[1])
            score = w[:, blk] ** 2 / torch.diag(u)[blk] ** 2
            for r in range(w.shape[0]):
                mask[r, blk][score[r].argsort()[: pattern[0]]] = True
        q = w[:, i].masked_fill(mask[:, i], 0)
        err = (w[:, i] - q) / u[i, i]
        w[:, i] = q
        w[:, i + 1:] -= torch.outer(err, u[i, i + 1:])
    return w.float(), mask


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_lazy_sweep_matches_the_naive_loop(pattern):
    w, _, h = _problem()
    res = sparsegpt_prune(w, h, 0.5, pattern, block_size=16)
    ref_w, ref_mask = _naive(w, h, 0.5, 16, pattern)
    assert torch.equal(res.mask, ref_mask)
    assert torch.allclose(res.weight, ref_w, atol=1e-4)  # measured max abs diff ~3e-6


def test_exact_sparsity_and_n_of_m():
    w, _, h = _problem(16, 64)
    assert sparsegpt_prune(w, h, 0.3).mask.float().mean().item() == pytest.approx(0.3, abs=1 / 128)
    res = sparsegpt_prune(w, h, pattern=(2, 4))
    assert bool((res.mask.reshape(16, -1, 4).sum(-1) == 2).all())
    assert bool((res.weight[res.mask] == 0).all())


def test_reconstruction_beats_magnitude_pruning():
    w, x, h = _problem(32, 64, 512)
    res = sparsegpt_prune(w, h, 0.5)
    mag = w.clone()
    mag[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    err_sgpt = (x @ (w - res.weight).T).pow(2).mean().item()
    err_mag = (x @ (w - mag).T).pow(2).mean().item()
    assert err_sgpt < 0.6 * err_mag  # measured ratio 0.38


def test_joint_quantization_lands_on_the_grid_with_exact_zeros():
    w, _, h = _problem(8, 64)
    spec = preset("W4_G32")
    res = sparsegpt_prune(w, h, 0.5, spec=spec)
    assert bool((res.weight[res.mask] == 0).all())
    scale, zero = res.scale, res.zero
    for g in range(2):
        cols = slice(32 * g, 32 * g + 32)
        q = res.weight[:, cols] / scale[:, g:g + 1] + zero[:, g:g + 1]
        assert torch.allclose(q, q.round(), atol=1e-3)  # every kept weight is a grid point
        # codes reproduce the weight exactly
        deq = scale[:, g:g + 1] * (res.codes[:, cols].float() - zero[:, g:g + 1])
        assert torch.allclose(deq, res.weight[:, cols], atol=1e-6)


def test_an_earlier_mask_stays_pruned():
    w, _, h = _problem(8, 32)
    prior = torch.zeros_like(w, dtype=torch.bool)
    prior[:, :3] = True
    res = sparsegpt_prune(w, h, 0.5, mask=prior)
    assert bool(res.mask[prior].all())
    assert res.mask.float().mean().item() == pytest.approx(0.5, abs=1 / 64)


def test_unseen_layer_is_pruned_by_magnitude():
    layer = torch.nn.Linear(8, 2, bias=False)
    layer.weight.data = torch.arange(16, dtype=torch.float32).reshape(2, 8) - 7.5
    prepared = get_method("sparsegpt", preset("W8"), {"sparsity": 0.5}).prepare_layer("l", layer, LayerStats())
    assert prepared.mask.sum().item() == 8 and "magnitude" in (prepared.note or "")


@pytest.mark.parametrize("recipe_methods", [
    [{"method": "sparsegpt", "options": {"sparsity": 0.5}}],
    [{"method": "sparsegpt", "options": {"pattern": "2:4"}}, {"method": "gptq", "spec": "W4_G32"}],
    [{"method": "sparsegpt", "spec": "W4_G32", "options": {"sparsity": 0.5, "quantize": True}}],
])
def test_recipes_on_a_tiny_model(tiny_llama, tiny_calib, recipe_methods):
    for entry in recipe_methods:
        entry["ignore"] = ["lm_head"]
    report = quantize(tiny_llama, {"name": "t", "methods": recipe_methods}, tiny_calib, batch_size=4, progress=False)
    for layer in report.layers:
        assert layer["sparsity"] >= 0.5  # exactly 0.5 pruned; a rounding code may also land on 0
    w = tiny_llama.model.layers[0].mlp.up_proj.weight.data
    assert (w == 0).float().mean().item() >= 0.5


def test_bad_options_are_refused_before_work():
    with pytest.raises(LowbitError, match="pattern"):
        get_method("sparsegpt", preset("W8"), {"pattern": "4:2"})
    with pytest.raises(LowbitError, match="sparsity"):
        get_method("sparsegpt", preset("W8"), {"sparsity": 1.0})
    with pytest.raises(LowbitError, match="int"):
        get_method("sparsegpt", preset("FP8_E4M3"), {"quantize": True})
