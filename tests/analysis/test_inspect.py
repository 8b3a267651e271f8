"""lowbit.analysis.inspect: hooks, weight statistics, error along depth, the analysis result."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.analysis import stats
from lowbit.analysis.inspect import (
    activation_stats,
    analyze_model,
    channel_absmax,
    decoder_linears,
    error_along_depth,
    weight_stats,
)
from lowbit.analysis.results import model_identity, read_results, write_results
from lowbit.errors import LowbitError
from lowbit.quantization import quantize
from lowbit.recipe import recipe_from_flags

TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_decoder_linears_in_depth_order(tiny_llama):
    layers = decoder_linears(tiny_llama)
    assert [n.rsplit(".", 1)[-1] for n in layers] == TYPES * 2
    assert [b for b, _ in layers.values()] == [0] * 7 + [1] * 7
    assert "lm_head" not in layers


def test_channel_absmax_matches_full_capture(tiny_llama, tiny_calib):
    # reference 1: store every input whole, in one forward over all windows
    layers = decoder_linears(tiny_llama)
    full: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: full[n].append(a[0].detach().clone()))
               for n, (_, m) in layers.items()]
    with torch.no_grad():
        out = tiny_llama(tiny_calib, output_hidden_states=True)
    for h in handles:
        h.remove()
    got = channel_absmax(tiny_llama, tiny_calib, batch_size=3)  # 3 + 3 + 2 windows, running max
    for name in layers:
        x = torch.cat(full[name]).reshape(-1, got[name].numel())
        assert torch.equal(got[name], x.abs().amax(0)), name
    # reference 2, independent of hooks: q_proj reads input_layernorm(hidden state entering the block)
    for i, block in enumerate(tiny_llama.model.layers):
        with torch.no_grad():
            x = block.input_layernorm(out.hidden_states[i])
        torch.testing.assert_close(got[f"model.layers.{i}.self_attn.q_proj"], x.abs().amax((0, 1)),
                                   rtol=1e-6, atol=0)  # measured 0


def test_activation_stats_find_an_injected_outlier_channel(tiny_llama, tiny_calib):
    with torch.no_grad():
        tiny_llama.model.layers[1].input_layernorm.weight[5] *= 100.0
    acts = activation_stats(tiny_llama, tiny_calib)
    q1 = acts["model.layers.1.self_attn.q_proj"]
    assert q1["type"] == "q_proj" and q1["block"] == 1 and q1["channels"] == 64
    assert q1["outliers"] == [5] and q1["top"][0] == 5
    assert q1["ratio"] > 50  # measured 103.3 (channel 5 scaled by 100)
    q0 = acts["model.layers.0.self_attn.q_proj"]
    assert q0["outliers"] == [] and q0["ratio"] < 2  # measured 1.24 on the random model
    down = acts["model.layers.0.mlp.down_proj"]
    exact = channel_absmax(tiny_llama, tiny_calib)["model.layers.0.mlp.down_proj"]
    stored = stats.absmax_values(down)
    assert len(stored) == 128 and stored == pytest.approx(exact.tolist(), rel=5e-4)  # 4 significant digits: measured 4.6e-4
    assert stats.channel_stats(exact)["outliers"] == down["outliers"]


def test_weight_stats_per_layer(tiny_llama):
    ws = weight_stats(tiny_llama)
    assert len(ws) == 14
    w = tiny_llama.model.layers[1].mlp.down_proj.weight
    got = ws["model.layers.1.mlp.down_proj"]
    assert got["shape"] == [64, 128] and got["block"] == 1
    assert got["kurtosis"] == stats.weight_summary(w)["kurtosis"]


def test_error_along_depth_zero_for_identical_models(tiny_llama, tiny_calib):
    rows = error_along_depth(tiny_llama, copy.deepcopy(tiny_llama), tiny_calib)
    assert [r["block"] for r in rows] == [0, 1]
    for r in rows:
        assert r["rel_error"] == 0.0 and r["local_rel_error"] == 0.0
        assert r["cosine"] == pytest.approx(1.0, abs=1e-12)  # measured 1 - cosine = 0


def test_error_along_depth_grows_with_depth_and_fewer_bits(tiny_llama, tiny_calib):
    errs = {}
    for bits in (2, 4):
        q = copy.deepcopy(tiny_llama)
        quantize(q, recipe_from_flags("rtn", bits, 16, True), tiny_calib, progress=False)
        errs[bits] = error_along_depth(tiny_llama, q, tiny_calib, batch_size=4)
    two, four = errs[2], errs[4]
    # measured (2-bit): block 0 rel 0.398 cosine 0.941, block 1 rel 0.693 (block alone 0.468) cosine 0.822
    assert two[0]["rel_error"] > 0.2
    assert two[1]["rel_error"] > two[0]["rel_error"]
    assert two[1]["rel_error"] > two[1]["local_rel_error"]  # accumulated error beats the block's own
    assert two[0]["rel_error"] == two[0]["local_rel_error"]  # block 0 sees identical inputs
    assert two[1]["cosine"] < two[0]["cosine"] < 1.0
    # measured (4-bit): 0.056 and 0.099
    assert all(f["rel_error"] < t["rel_error"] / 3 for f, t in zip(four, two))


def test_error_along_depth_rejects_other_depth(tiny_llama, tiny_calib):
    other = copy.deepcopy(tiny_llama)
    del other.model.layers[1]
    with pytest.raises(LowbitError, match="differ in depth"):
        error_along_depth(tiny_llama, other, tiny_calib)
    with pytest.raises(LowbitError, match="2-D tensor of token ids"):
        error_along_depth(tiny_llama, tiny_llama, tiny_calib[0])


def test_analyze_model_result_round_trips(tiny_llama, tiny_calib, tmp_path):
    q = copy.deepcopy(tiny_llama)
    quantize(q, recipe_from_flags("rtn", 4, 16, True), tiny_calib, progress=False)
    res = analyze_model(tiny_llama, tiny_calib[:4], "tiny", quantized=q, quantized_name="rtn-w4g16",
                        data={"source": "random"})
    assert res["kind"] == "analysis"
    assert res["model"] == model_identity(tiny_llama, "tiny")
    assert res["data"] == {"nsamples": 4, "seqlen": 32, "tokens": 128, "source": "random"}
    assert set(res["activation_summary"]) == set(TYPES)
    assert res["activation_summary"]["q_proj"]["layers"] == 2
    assert res["error_along_depth"]["quantized"] == "rtn-w4g16"
    assert len(res["error_along_depth"]["blocks"]) == 2
    write_results(tmp_path, "analysis", res)
    back = read_results(tmp_path, "analysis")
    assert back == json.loads(json.dumps(res))
    assert analyze_model(tiny_llama, tiny_calib[:2], "tiny")["error_along_depth"] is None


@pytest.mark.model
def test_real_model_has_outlier_channels(smollm, data_dir):
    from lowbit.data import get_calibration

    model, tok = smollm
    calib = get_calibration("wikitext2", tok, nsamples=2, seqlen=256, seed=0)
    acts = activation_stats(model, calib, batch_size=2)
    assert len(acts) == 30 * 7
    summary = stats.summarize_activations(acts)
    # measured on 2 x 256 wikitext2 tokens (seed 0): max/median 3315 at model.layers.11.mlp.down_proj
    # (absmax 3065 vs median 0.92); q/k/v inputs: mean max/median 13.9, 2.97 outlier channels per layer,
    # channel 308 an outlier in 19 of 30 blocks, 247 in 16, 507 in 15 (the residual stream's fixed channels)
    worst = max(acts.values(), key=lambda s: s["ratio"])
    assert worst["ratio"] > 300 and worst["type"] == "down_proj"
    assert summary["q_proj"]["mean_ratio"] > 6
    assert summary["q_proj"]["mean_outliers"] >= 1
    assert summary["q_proj"]["recurring_outliers"][0][1] >= 10  # one channel is an outlier in many blocks


def test_packed_checkpoint_is_analyzed_through_its_dequantized_weights(tiny_llama, tiny_calib, tmp_path):
    """A compressed-tensors checkpoint loads with packed QuantLinear layers: still found, still compared."""
    from lowbit.models.loading import load_model
    from lowbit.quantization import save_quantized

    q = copy.deepcopy(tiny_llama)
    quantize(q, recipe_from_flags("rtn", 4, 16, True), tiny_calib, progress=False)
    out, fmt = save_quantized(q, None, None, tmp_path / "q", "compressed-tensors")
    packed, _ = load_model(out, require_tokenizer=False)
    layer = packed.model.layers[0].self_attn.q_proj
    assert not isinstance(layer, torch.nn.Linear)  # a packed layer, found by decoder_linears all the same
    assert len(decoder_linears(packed)) == 14
    ws = weight_stats(packed)["model.layers.0.self_attn.q_proj"]
    assert ws["kurtosis"] == pytest.approx(stats.weight_summary(q.model.layers[0].self_attn.q_proj.weight)["kurtosis"],
                                           rel=1e-6)  # measured: identical (same dequantized values)
    fake = error_along_depth(tiny_llama, q, tiny_calib)
    real = error_along_depth(tiny_llama, packed, tiny_calib)
    for f, r in zip(fake, real):
        assert r["rel_error"] == pytest.approx(f["rel_error"], rel=1e-6)  # measured: identical on CPU
