"""The sequential pipeline on a tiny model from a config, and GPTQ vs RTN on real inputs."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods.gptq import gptq_quantize
from lowbit.core.quant import dequantize, quantize as quantize_tensor
from lowbit.quantization import quantize
from lowbit.spec import QuantSpec

W4G32 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True}


def _recipe(method: str, spec=W4G32, **options):
    return {"name": f"t-{method}", "methods": [{"method": method, "spec": spec, "options": options}]}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pipeline_runs_each_method_on_tiny_model(tiny_llama, tiny_calib, method):
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    report = quantize(tiny_llama, _recipe(method), tiny_calib, batch_size=4, progress=False)
    assert len(report.layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert report.bits_per_weight == pytest.approx(4 + 32 / 32)  # 4-bit codes + fp32 scale per 32 weights
    assert report.calib_tokens == 8 * 32
    for layer in report.layers:
        assert layer["output_error"] is not None and 0 < layer["output_error"] < 0.1
        w = dict(tiny_llama.named_parameters())[layer["name"] + ".weight"]
        assert not torch.equal(w, before[layer["name"] + ".weight"])
    # embeddings, norms and lm_head are untouched
    assert torch.equal(tiny_llama.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert torch.equal(tiny_llama.model.norm.weight, before["model.norm.weight"])


def test_gptq_has_lower_output_error_than_rtn_on_tiny_model(tiny_llama, tiny_calib):
    import copy

    a = quantize(copy.deepcopy(tiny_llama), _recipe("rtn"), tiny_calib, progress=False)
    b = quantize(copy.deepcopy(tiny_llama), _recipe("gptq"), tiny_calib, progress=False)
    assert b.mean_output_error() < a.mean_output_error()


def test_pipeline_propagates_quantized_outputs(tiny_llama, tiny_calib):
    """Block 1 is calibrated on block 0's quantized outputs: its input differs from the fp run."""
    from lowbit.models.capture import capture_block_inputs
    from lowbit.models.capture import run_block

    blocks = tiny_llama.model.layers
    fp_in = capture_block_inputs(tiny_llama, blocks[0], tiny_calib, 8)
    fp_out = run_block(blocks[0], fp_in)
    seen = []
    hook = blocks[1].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()),
                                               with_kwargs=True)
    quantize(tiny_llama, _recipe("rtn"), tiny_calib, batch_size=8, progress=False)
    hook.remove()
    q_out = run_block(blocks[0], fp_in)
    assert any(torch.allclose(s, q_out.hidden[0]) for s in seen)
    assert not torch.allclose(q_out.hidden[0], fp_out.hidden[0])


def test_gptq_single_layer_beats_rtn_on_real_inputs(smollm, data_dir):
    """On real calibration inputs of smollm2 layer 5's down_proj, GPTQ's output error is below RTN's."""
    from lowbit.data import get_calibration

    model, tok = smollm
    calib = get_calibration("wikitext2", tok, nsamples=4, seqlen=512, seed=0)
    xs = []
    layer = model.model.layers[5].mlp.down_proj
    h = layer.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib)
    h.remove()
    x = torch.cat(xs)
    hess = 2 * x.T @ x / x.shape[0]
    w = layer.weight.data
    spec = QuantSpec(type="int", bits=3, granularity="group", group_size=64, symmetric=True)

    def err(wq):
        return ((x @ (w - wq).T) ** 2).sum().item() / ((x @ w.T) ** 2).sum().item()

    rtn = err(dequantize(quantize_tensor(w, spec)))
    gptq = err(gptq_quantize(w, hess, spec).weight)
    assert gptq < 0.5 * rtn  # measured: gptq 0.0158 vs rtn 0.0622 (ratio 0.25)


@pytest.mark.parametrize("method", ["gptq", "owq"])  # Hessian-driven methods
def test_layer_without_calibration_tokens_falls_back_to_rtn(tiny_llama, tiny_calib, method):
    """Like an expert the router never picks: up_proj of block 0 is bypassed, so no token reaches it."""
    import warnings

    mlp = tiny_llama.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = quantize(tiny_llama, _recipe(method), tiny_calib, batch_size=4, progress=False)
    rows = {r["name"]: r for r in report.layers}
    skipped = rows["model.layers.0.mlp.up_proj"]
    assert skipped["method"] == "rtn" and "no calibration tokens" in skipped["note"]
    assert any("up_proj: no calibration tokens" in str(w.message) for w in caught)
    assert torch.isfinite(mlp.up_proj.weight).all() and mlp.up_proj.weight.abs().sum() > 0
    assert all(r["note"] is None for n, r in rows.items() if n != "model.layers.0.mlp.up_proj")
