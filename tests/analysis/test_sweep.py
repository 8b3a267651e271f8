"""Sweeps: configuration lists, resuming, refusing another model's directory, and a real two-point sweep."""

from __future__ import annotations

import copy

import json

import pytest

from lowbit.analysis.executors import InlineExecutor, LocalExecutor, make_executor
from lowbit.analysis.sweep import SweepConfig, SweepData, expand, parse_group, parse_list, run_sweep, sweep_markdown
from lowbit.errors import LowbitError

TINY_DATA = SweepData(nsamples=4, seqlen=128, eval_seqlen=256, eval_windows=1)


def test_expand_names_every_combination_and_refuses_bad_lists():
    configs = expand(["rtn", "gptq"], [4, 3], [64, None])
    assert [c.name for c in configs] == ["rtn-w4g64", "rtn-w4-channel", "rtn-w3g64", "rtn-w3-channel",
                                         "gptq-w4g64", "gptq-w4-channel", "gptq-w3g64", "gptq-w3-channel"]
    assert configs[1].recipe()["methods"][0]["spec"] == {"type": "int", "bits": 4, "symmetric": False,
                                                         "granularity": "channel"}
    with pytest.raises(LowbitError, match="method list is empty"):
        parse_list(" , ", "method")
    with pytest.raises(LowbitError, match="method list is empty"):
        expand([], [4], [64])
    with pytest.raises(LowbitError, match="sweepable weight-only methods"):
        expand(["smoothquant"], [8], [64])
    with pytest.raises(LowbitError, match="1..8"):
        expand(["rtn"], [16], [64])
    with pytest.raises(LowbitError, match="cannot read the bits list"):
        parse_list("4,x", "bits", int)
    assert parse_list("64,channel", "group size", parse_group) == [64, None]
    with pytest.raises(LowbitError, match="unknown executor"):
        make_executor("slurm")
    with pytest.raises(LowbitError, match="at least 1"):
        LocalExecutor(0)


def test_sparsity_axis_names_and_recipes():
    configs = expand(["none", "gptq"], [4], [64], [0.0, 0.5], "wanda")
    assert [c.name for c in configs] == ["gptq-w4g64", "wanda50", "wanda50-gptq-w4g64"]
    assert [e["method"] for e in configs[2].recipe()["methods"]] == ["wanda", "gptq"]
    assert configs[2].recipe()["methods"][0]["options"] == {"sparsity": 0.5}
    assert [e["method"] for e in configs[1].recipe()["methods"]] == ["wanda"]
    assert configs[1].row()["sparsity"] == 0.5 and configs[0].row()["pruner"] is None
    with pytest.raises(LowbitError, match=r"sparsities must lie in \[0, 1\)"):
        expand(["rtn"], [4], [64], [1.0])
    with pytest.raises(LowbitError, match="unknown pruner"):
        expand(["rtn"], [4], [64], [0.5], "random")
    with pytest.raises(LowbitError, match="needs a sparsity above 0"):
        expand(["none"], [4], [64], [0.0])


def test_sparsity_sweep_runs_on_a_tiny_model_and_plots(tiny_llama, tiny_calib, tmp_path):
    """Each configuration's recipe runs (pruned only, pruned then quantized) and the plot draws one line per
    quantization across sparsities."""
    from lowbit.analysis.plots import plot_ppl_vs_sparsity
    from lowbit.quantization import quantize

    rows = []
    for c in expand(["none", "rtn"], [4], [32], [0.0, 0.5], "magnitude"):
        model = copy.deepcopy(tiny_llama)
        report = quantize(model, c.recipe(), tiny_calib, batch_size=4, progress=False)
        w = model.model.layers[0].mlp.up_proj.weight
        assert (w == 0).float().mean().item() >= (0.5 if c.sparsity else 0.0)
        rows.append(c.row() | {"status": "ok", "perplexity": 10.0 + 10 * c.sparsity + c.bits,
                               "bits_per_weight": report.bits_per_weight})
    path = plot_ppl_vs_sparsity(rows, tmp_path / "s.png", 9.0)
    assert path.stat().st_size > 1000


def _fake_runner(calls):
    def run(job):
        calls.append(job.config.name)
        c = job.config
        return {"config": c.name, "method": c.method, "bits": c.bits, "group_size": c.group_size, "status": "ok",
                "bits_per_weight": c.bits + 0.5, "size_mb": 1.0, "perplexity": 20.0 + 10.0 / c.bits, "kl": 0.1,
                "top1": 0.9, "quant_seconds": 1.0, "peak_rss_mb": 100.0}
    return run


@pytest.mark.model
def test_sweep_resumes_and_refuses_other_models_and_data(smollm, tmp_path):
    calls: list[str] = []
    out = tmp_path / "sweep"
    run_sweep("smollm2-135m", expand(["rtn"], [4, 3], [64]), out, InlineExecutor(), TINY_DATA,
              runner=_fake_runner(calls), log=lambda s: None)
    sweep = run_sweep("smollm2-135m", expand(["rtn"], [4, 3, 2], [64]), out, InlineExecutor(), TINY_DATA,
                      runner=_fake_runner(calls), log=lambda s: None)
    assert calls == ["rtn-w4g64", "rtn-w3g64", "rtn-w2g64"]  # the second run only did what was missing
    assert [r["config"] for r in sweep["rows"]] == ["rtn-w4g64", "rtn-w3g64", "rtn-w2g64"]
    assert sweep["fp"]["perplexity"] > 1 and (out / "sweep.md").read_text() == sweep_markdown(sweep)
    run_sweep("smollm2-135m", expand(["rtn"], [4, 3, 2], [64]), out, InlineExecutor(), TINY_DATA,
              runner=_fake_runner(calls), log=lambda s: None, redo=("rtn-w3g64",))
    assert calls[3:] == ["rtn-w3g64"]  # finished, but named in redo
    with pytest.raises(LowbitError, match="other data settings"):
        run_sweep("smollm2-135m", expand(["rtn"], [4], [64]), out, InlineExecutor(),
                  SweepData(nsamples=8, seqlen=128, eval_seqlen=256, eval_windows=1), runner=_fake_runner(calls))
    stored = json.loads((out / "sweep.json").read_text())
    assert stored["device"] == "cpu"
    (out / "sweep.json").write_text(json.dumps(stored | {"device": "cuda"}))
    with pytest.raises(LowbitError, match="run on cuda, not cpu"):  # GPU timings beside CPU ones would mislead
        run_sweep("smollm2-135m", expand(["rtn"], [4], [64]), out, InlineExecutor(), TINY_DATA,
                  runner=_fake_runner(calls))
    older = {k: v for k, v in stored.items() if k != "device"}  # written before the entry: read from the rows
    older["rows"] = [r | {"device": "cuda:0"} for r in stored["rows"]]
    (out / "sweep.json").write_text(json.dumps(older))
    with pytest.raises(LowbitError, match="run on cuda, not cpu"):
        run_sweep("smollm2-135m", expand(["rtn"], [4], [64]), out, InlineExecutor(), TINY_DATA,
                  runner=_fake_runner(calls))
    stored["model"] |= {"name": "llama-7b", "fingerprint": "0123456789abcdef"}
    (out / "sweep.json").write_text(json.dumps(stored))
    with pytest.raises(LowbitError, match="not of 'smollm2-135m'"):
        run_sweep("smollm2-135m", expand(["rtn"], [4], [64]), out, InlineExecutor(), TINY_DATA,
                  runner=_fake_runner(calls))


@pytest.mark.model
def test_real_sweep_in_a_worker_process(smollm, tmp_path):
    sweep = run_sweep("smollm2-135m", [SweepConfig("rtn", 3, 64)], tmp_path, LocalExecutor(1), TINY_DATA, threads=2,
                      log=lambda s: None)
    (row,) = sweep["rows"]
    assert row["status"] == "ok" and row["config"] == "rtn-w3g64"
    assert row["bits_per_weight"] == pytest.approx(3 + 35 / 64)  # an fp32 scale and a 3-bit zero per 64 weights
    assert row["perplexity"] > 1.2 * sweep["fp"]["perplexity"]  # measured 102 (one 256-token window)
    assert 0.01 < row["kl"] and row["top1"] < 0.95  # measured KL 1.30, top-1 42%
    assert row["size_mb"] < sweep["fp"]["size_mb"] / 3  # measured 153 MB vs 513 (embedding still fp32)


def test_executors_return_results_and_failures_per_job():
    import math

    for ex in (InlineExecutor(), LocalExecutor(2)):
        got = dict(ex.run(math.sqrt, [4.0, -1.0, 9.0]))  # a picklable function a spawned worker can import
        assert got[4.0] == 2.0 and got[9.0] == 3.0
        assert isinstance(got[-1.0], ValueError)  # the failed job only


def test_sweep_refuses_a_device_this_machine_lacks(tmp_path):
    import torch

    with pytest.raises(LowbitError, match="unknown device"):
        run_sweep("smollm2-135m", expand(["rtn"], [4], [64]), tmp_path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="sees no CUDA GPU"):
            run_sweep("smollm2-135m", expand(["rtn"], [4], [64]), tmp_path, device="cuda")
    assert not any(tmp_path.iterdir())  # refused before anything was written
