"""Structured pruning: cuts that remove only silent units leave the logits unchanged, the ranking matches naive
references, the smaller model saves as a checkpoint plain transformers loads, and plans hit their target."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.structured import StructuredPlan, prune_structured
from lowbit.structured import importance as imp
from lowbit.structured.prune import count_params, params_of, plan_for_target
from lowbit.structured.surgery import head_dim_of, keep_query_heads


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture()
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_importance_against_naive_loops():
    sq = torch.tensor([4.0, 1.0, 9.0, 0.0, 16.0, 1.0])
    assert imp.channel_scores(sq).tolist() == [2.0, 1.0, 3.0, 0.0, 4.0, 1.0]
    assert imp.top_channels(imp.channel_scores(sq), 3).tolist() == [0, 2, 4]
    heads = imp.head_scores(sq, 3)  # heads of 2 channels
    assert heads.tolist() == pytest.approx([5 ** 0.5, 9 ** 0.5, 17 ** 0.5])
    # 4 heads in 2 groups of 2, keep 1 per group: the louder of (0, 1) and of (2, 3)
    assert imp.heads_to_keep(torch.tensor([1.0, 3.0, 5.0, 2.0]), 2, 1).tolist() == [1, 2]
    infl = imp.block_influence(torch.tensor([9.0, 5.0, 8.0]), 10)
    assert infl.tolist() == pytest.approx([0.1, 0.5, 0.2])
    assert imp.layers_to_drop(infl, 2) == [0, 2]


def test_silent_mlp_channels_are_the_ones_cut(tiny_llama, tiny_calib, ids):
    with torch.no_grad():
        for block in tiny_llama.model.layers:  # channels 0..31 of every block: gate rows 0, so silu(0) * up = 0
            block.mlp.gate_proj.weight[:32] = 0
    ref = _logits(tiny_llama, ids)
    rep = prune_structured(tiny_llama, tiny_calib, StructuredPlan(intermediate_size=96))
    assert tiny_llama.config.intermediate_size == 96 and tiny_llama.model.layers[0].mlp.down_proj.in_features == 96
    assert torch.allclose(_logits(tiny_llama, ids), ref, atol=1e-5)  # measured max diff ~1e-6
    assert rep.params_after < rep.params_before


def test_query_head_surgery_keeps_gqa_mapping(tiny_llama, ids):
    hd = head_dim_of(tiny_llama)  # 4 query heads, 2 key/value heads: groups (0, 1) and (2, 3)
    with torch.no_grad():
        for block in tiny_llama.model.layers:  # heads 1 and 3 write nothing
            for h in (1, 3):
                block.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    ref = _logits(tiny_llama, ids)
    keep_query_heads(tiny_llama, [torch.tensor([0, 2])] * 2)
    assert tiny_llama.config.num_attention_heads == 2 and tiny_llama.config.head_dim == hd
    assert torch.allclose(_logits(tiny_llama, ids), ref, atol=1e-5)


def test_identity_block_is_dropped_and_cache_still_works(tiny_llama, tiny_calib, ids):
    with torch.no_grad():  # block 0 adds nothing to the residual stream: influence 0
        tiny_llama.model.layers[0].self_attn.o_proj.weight.zero_()
        tiny_llama.model.layers[0].mlp.down_proj.weight.zero_()
    ref = _logits(tiny_llama, ids)
    rep = prune_structured(tiny_llama, tiny_calib, StructuredPlan(drop_layers=1))
    assert rep.dropped == [0] and tiny_llama.config.num_hidden_layers == 1
    assert torch.allclose(_logits(tiny_llama, ids), ref, atol=1e-5)
    out = tiny_llama.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)  # KV cache indexed by the new layer_idx
    assert out.shape == (1, 12)


def test_pruned_checkpoint_loads_in_plain_transformers(tiny_llama, tiny_calib, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = StructuredPlan(intermediate_size=64, heads_per_group=1, hidden_size=48, drop_layers=1)
    rep = prune_structured(tiny_llama, tiny_calib, plan)
    assert rep.config == {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_key_value_heads": 2, "num_hidden_layers": 1, "head_dim": 16}
    assert rep.params_after == count_params(tiny_llama)
    ref = _logits(tiny_llama, ids)
    tiny_llama.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert count_params(loaded) == rep.params_after
    assert torch.allclose(_logits(loaded, ids), ref, atol=1e-5)  # measured max diff 0.0


def test_plans_reach_their_parameter_target(tiny_llama):
    cfg = tiny_llama.config
    full = params_of(cfg, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                     head_dim_of(tiny_llama))
    assert full == count_params(tiny_llama)  # the formula counts the model exactly
    width = plan_for_target(tiny_llama, 0.7, "width")
    got = params_of(cfg, width.hidden_size, width.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                    head_dim_of(tiny_llama))
    assert got <= 0.7 * full and got > 0.6 * full
    assert plan_for_target(tiny_llama, 0.8, "depth").drop_layers == 1


def test_bad_plans_are_refused_before_work(tiny_llama, tiny_calib):
    with pytest.raises(LowbitError, match="intermediate_size must be in 1..128"):
        prune_structured(tiny_llama, tiny_calib, StructuredPlan(intermediate_size=500))
    with pytest.raises(LowbitError, match="drop_layers must be in 0..1"):
        prune_structured(tiny_llama, tiny_calib, StructuredPlan(drop_layers=2))
    with pytest.raises(LowbitError, match="target fraction"):
        plan_for_target(tiny_llama, 1.5)


def test_other_architectures_are_refused(tiny_calib):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).eval()
    with pytest.raises(LowbitError, match="Llama-layout"):
        prune_structured(model, tiny_calib, StructuredPlan(drop_layers=0))


def test_prune_structured_cli_end_to_end(run_cli, smollm, data_dir, tmp_path):
    """Depth pruning of the real model through the CLI: a smaller checkpoint plain transformers loads."""
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "depth"
    code, stdout, err = run_cli("prune", "smollm2-135m", "--structured", "depth", "--drop-layers", "3", "--nsamples", "4",
                                "--importance", "taylor",
                                "--seqlen", "128", "--eval", "--max-windows", "1", "--eval-seqlen", "256",
                                "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["config"]["num_hidden_layers"] == 27 and len(summary["dropped_layers"]) == 3
    assert summary["fraction"] == pytest.approx(0.9, abs=0.03)  # measured 0.905: embeddings stay
    assert summary["ppl_after"] > summary["ppl_before"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 27 and count_params(loaded) == summary["params_after"]


@pytest.mark.parametrize(("args", "needles"), [
    (("--structured", "width"), ("either --keep-params",)),
    (("--structured", "width", "--keep-params", "1.2"), ("--keep-params must be in (0, 1)",)),
    (("--hidden-size", "9999"), ("hidden_size must be in 1..576",)),
    (("--keep-params", "0.7", "--drop-layers", "2"), ("not both",)),
])
def test_bad_structured_input(run_cli, clean_error, smollm, args, needles, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("prune", "smollm2-135m", *args, "--out", str(out))
    clean_error(code, err, *needles)
    assert not out.exists()


def test_hidden_size_must_divide_by_the_heads(tiny_llama, tiny_calib):
    with pytest.raises(LowbitError, match="multiple of the 4 attention heads"):
        prune_structured(tiny_llama, tiny_calib, StructuredPlan(hidden_size=50))
    assert plan_for_target(tiny_llama, 0.5, "width").hidden_size % 4 == 0


def test_taylor_scores_against_a_manual_backward(tiny_llama, tiny_calib):
    from lowbit.structured.taylor import taylor_scores

    scores = taylor_scores(tiny_llama, tiny_calib, batch_size=8)  # one batch: the whole calibration set
    tiny_llama.zero_grad()
    for p in tiny_llama.parameters():
        p.requires_grad_(True)
    tiny_llama(input_ids=tiny_calib, labels=tiny_calib).loss.backward()
    mlp = tiny_llama.model.layers[1].mlp
    sal = lambda lin: (lin.weight.detach() * lin.weight.grad).abs().double()  # noqa: E731
    ref = sal(mlp.gate_proj).sum(1) + sal(mlp.up_proj).sum(1) + sal(mlp.down_proj).sum(0)
    assert torch.allclose(scores.mlp[1], ref, rtol=1e-5)  # measured max rel diff ~1e-7
    assert scores.layers.shape == (2,) and scores.hidden.shape == (64,) and scores.heads[0].shape == (4,)


def test_taylor_cuts_silent_channels_and_restores_flags(tiny_llama, tiny_calib, ids):
    with torch.no_grad():
        for block in tiny_llama.model.layers:
            block.mlp.gate_proj.weight[:32] = 0
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    ref = _logits(tiny_llama, ids)
    prune_structured(tiny_llama, tiny_calib, StructuredPlan(intermediate_size=96), importance="taylor")
    assert torch.allclose(_logits(tiny_llama, ids), ref, atol=1e-5)
    assert all(not p.requires_grad and p.grad is None for p in tiny_llama.parameters())
