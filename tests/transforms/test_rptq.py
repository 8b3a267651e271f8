"""RPTQ: k-means channel clusters, cluster-wise static ranges, and the reorder folded exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.activations.quantizer import ActQuantizer, ClusterActQuantizer
from lowbit.core.affine import spec_qparams
from lowbit.core.kmeans import kmeans
from lowbit.errors import LowbitError
from lowbit.methods.base import get_method
from lowbit.models.capture import capture_block_inputs, run_block
from lowbit.pipeline.sequential import BlockContext
from lowbit.quantization import quantize
from lowbit.spec import QuantSpec, preset
from lowbit.transforms import get_transform
from lowbit.transforms.rptq import cluster_order

A8_ASYM = QuantSpec(type="int", bits=8, granularity="tensor", symmetric=False)


def test_kmeans_finds_separated_clusters_and_numbers_them_by_centre():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 10.0], [-5.0, 0.0], [0.0, 3.0]])
    truth = torch.arange(3).repeat_interleave(20)
    pts = centres[truth] + 0.1 * torch.randn(60, 2, generator=g)
    labels, got = kmeans(pts, 3, seed=1)
    # numbered by ascending centre: (-5, 0) -> 0, (0, 3) -> 1, (10, 10) -> 2
    assert torch.equal(labels, torch.tensor([2, 0, 1]).repeat_interleave(20))
    assert (got - centres[[1, 2, 0]]).abs().max() < 0.1
    assert torch.equal(kmeans(pts, 3, seed=1)[0], labels)  # deterministic
    assert kmeans(pts[:2], 5)[0].max() == 1  # k capped at the number of points


def test_cluster_quantizer_equals_per_cluster_naive_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g) * torch.tensor([1.0, 20.0, 1.0, 20.0, 0.1, 1.0])
    ids = torch.tensor([0, 1, 0, 1, 2, 0])
    q = ClusterActQuantizer(A8_ASYM, ids)
    q.observe(x[:32])
    q.observe(x[32:])
    q.freeze()
    ref = torch.empty_like(x)
    for c in range(3):  # naive: each cluster's columns as one per-tensor static quantizer
        cols = ids == c
        per = ActQuantizer(A8_ASYM)
        per.observe(x[:, cols])
        per.freeze()
        ref[:, cols] = per(x[:, cols])
    assert torch.equal(q(x), ref)
    s, _ = spec_qparams(q.xmin, q.xmax, A8_ASYM)
    assert s[1] > 10 * s[0]  # the wide cluster does not stretch the narrow one's grid


def _rptq_all_blocks(model, calib, transform):
    inputs = capture_block_inputs(model, model.model.layers[0], calib, 4)
    method = get_method("rtn", preset("W8"), activations=A8_ASYM)
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        layers = {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)}
        transform.apply_block(BlockContext(model, block, i, prefix, inputs, layers, {n: method for n in layers}))
        inputs = run_block(block, inputs)


def test_reorder_leaves_the_fp_model_unchanged(tiny_llama, tiny_calib):
    with torch.no_grad():
        ref = tiny_llama(tiny_calib[:2]).logits
    t = get_transform("rptq", {"clusters": 4})
    _rptq_all_blocks(tiny_llama, tiny_calib, t)
    with torch.no_grad():
        got = tiny_llama(tiny_calib[:2]).logits
    assert (got - ref).abs().max().item() < 1e-5  # measured 2.1e-7 (matmul sums in another order)
    recs = {(r["block"], r["linears"][0]): r for r in t.records}
    assert recs[(0, "self_attn.q_proj")]["reordered"] and recs[(0, "mlp.down_proj")]["reordered"]
    assert not recs[(0, "self_attn.o_proj")]["reordered"]  # grouped-query attention: heads pin the order
    ids = t.input_quantizer("model.layers.0.mlp.down_proj", ActQuantizer(A8_ASYM)).clusters
    assert torch.equal(ids, torch.sort(ids).values)  # contiguous clusters after the reorder


def test_cluster_order_is_a_stable_sort():
    assert cluster_order(torch.tensor([2, 0, 1, 0])).tolist() == [1, 3, 2, 0]


def test_rptq_beats_one_static_range_and_round_trips(tiny_llama, tiny_calib, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.quantization import save_quantized

    with torch.no_grad():  # outlier channels on both norms, as in real LLMs
        for layer in tiny_llama.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 30.0
            layer.post_attention_layernorm.weight[[5]] = 30.0
        ref = tiny_llama(tiny_calib[:2]).logits
    static = copy.deepcopy(tiny_llama)
    quantize(static, "w8a8-static", tiny_calib, progress=False)
    report = quantize(tiny_llama, "w8a8-rptq", tiny_calib, progress=False)
    with torch.no_grad():
        e_static = (static(tiny_calib[:2]).logits - ref).pow(2).mean().item()
        got = tiny_llama(tiny_calib[:2]).logits
    e_rptq = (got - ref).pow(2).mean().item()
    assert e_rptq < e_static / 5  # measured 1.5e-5 vs 3.0e-4
    assert report.extra["transforms"]["rptq"]
    out, fmt = save_quantized(tiny_llama, None, report, tmp_path / "q")
    assert fmt == "fake-quant"  # a run-time norm reorder has no compressed-tensors form
    back, _ = load_model(out, require_tokenizer=False)
    with torch.no_grad():
        assert (back(tiny_calib[:2]).logits - got).abs().max().item() < 1e-5  # measured 0.0


def test_dynamic_spec_is_refused(tiny_llama, tiny_calib):
    rec = {"name": "x", "transforms": [{"transform": "rptq"}],
           "methods": [{"method": "rtn", "spec": "W8", "activations": "A8_TOKEN"}]}
    with pytest.raises(LowbitError, match="static int spec"):
        quantize(tiny_llama, rec, tiny_calib, progress=False)
    with pytest.raises(LowbitError, match="clusters must be"):
        get_transform("rptq", {"clusters": 0})
