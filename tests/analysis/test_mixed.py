"""Mixed precision end to end: sensitivity -> allocation -> recipe -> quantize, budgets, reuse, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.analysis import mixed
from lowbit.analysis.candidates import as_candidates
from lowbit.analysis.mixed import layer_costs, mixed_precision_recipe
from lowbit.analysis.results import model_identity, read_results, write_results
from lowbit.errors import LowbitError
from lowbit.quantization import quantize

TINY = dict(eval_windows=4, eval_seqlen=32)  # tiny_calib is 8 windows x 32 tokens


def test_end_to_end_gptq_meets_the_budget(tiny_llama, tiny_calib):
    model = tiny_llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe, summary = mixed_precision_recipe(model, None, tiny_calib, method="gptq", target_bpw=4.0, **TINY)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # sensitivity left it as it was
    # uniform w3g64 sym is 3.5 bpw, w4g64 4.5: 4.0 is between, so at least two formats are used
    assert summary["uniform"]["w3g64"]["bpw"] == 3.5 and summary["uniform"]["w4g64"]["bpw"] == 4.5
    assert sum(1 for n in summary["counts"].values() if n) >= 2
    assert sum(summary["counts"].values()) == 14 and summary["exact"]
    assert summary["achieved_bpw"] <= 4.0
    assert summary["lower_bound"] <= summary["predicted_loss"]
    # at the same budget, no worse than the uniform formats that fit (w3g64 at 3.5 bpw)
    assert summary["predicted_loss"] <= summary["uniform"]["w3g64"]["predicted_loss"]
    targets = [t for e in recipe["methods"] for t in e["targets"]]
    assert sorted(targets) == sorted(layer_costs(model, as_candidates(mixed.DEFAULT_CANDIDATES)))
    report = quantize(model, recipe, tiny_calib, progress=False)
    assert len(report.layers) == 14
    assert report.bits_per_weight <= 4.0
    assert report.bits_per_weight == pytest.approx(summary["achieved_bpw"], rel=1e-12)  # same bit count
    per_layer = {l["name"]: l["bits_per_weight"] for l in report.layers}
    for name, label in summary["layers"].items():
        expected = {"w2g64": 2.5, "w3g64": 3.5, "w4g64": 4.5, "w8": 8 + 32 / 64 if "down" not in name else 8 + 32 / 128}
        assert per_layer[name] == pytest.approx(expected[label], rel=1e-12)


def test_target_mb_proxy_loss_and_reuse(tiny_llama, tiny_calib, tmp_path):
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # per block q, o: 64x64; k, v: 32x64; gate, up, down: 128x64
    mb = 3.75 * weights / 8e6
    _, first = mixed_precision_recipe(tiny_llama, None, tiny_calib, method="rtn", target_mb=mb,
                                      sensitivity=tmp_path, **TINY)
    assert first["weights"] == weights and first["achieved_mb"] <= mb and not first["sensitivity"]["reused"]
    stored = read_results(tmp_path, "sensitivity")
    assert stored["model"]["fingerprint"] == model_identity(tiny_llama, "x")["fingerprint"]
    recipe2, again = mixed_precision_recipe(tiny_llama, None, tiny_calib, method="rtn", target_mb=mb,
                                            sensitivity=tmp_path, **TINY)
    assert again["sensitivity"]["reused"] and again["layers"] == first["layers"]
    _, proxy = mixed_precision_recipe(tiny_llama, None, tiny_calib, method="rtn", target_mb=mb, sensitivity=stored,
                                      loss="proxy", **TINY)
    assert proxy["loss"] == "proxy" and proxy["achieved_mb"] <= mb
    # stored results that lack a candidate, or belong to another model, are refused
    with pytest.raises(LowbitError, match="no sensitivity for candidate"):
        mixed_precision_recipe(tiny_llama, None, tiny_calib, target_bpw=4.8, options=[(4, 64), (4, 32)],
                               sensitivity=stored, **TINY)
    other = dict(stored, model={"name": "other", "fingerprint": "0" * 16})
    write_results(tmp_path, "sensitivity", other)
    with pytest.raises(LowbitError, match="not of"):
        mixed_precision_recipe(tiny_llama, None, tiny_calib, target_bpw=4.0, sensitivity=tmp_path, **TINY)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"target_bpw": 2.0}, "below the smallest allocation the candidates allow: 2.5000 bpw"),
    ({"target_bpw": 9.0}, "above the largest allocation the candidates allow"),
    ({"target_bpw": 4.0, "target_mb": 1.0}, "exactly one of"),
    ({}, "exactly one of"),
    ({"target_bpw": -1.0}, "positive"),
    ({"target_bpw": 4.0, "method": "gptx"}, "unknown method"),
    ({"target_bpw": 4.0, "method_options": {"dampp": 1}}, "dampp"),
    ({"target_bpw": 4.0, "options": [(4, 48), (8, None)]}, "group size 48 does not divide"),
    ({"target_bpw": 4.0, "loss": "mse"}, "loss must be one of"),
    ({"target_bpw": 4.0, "eval_windows": 9}, "needs 9 calibration windows"),
])
def test_bad_requests_fail_before_any_work(tiny_llama, tiny_calib, monkeypatch, kw, needle):
    def boom(*a, **k):
        raise AssertionError("sensitivity was measured before the input was checked")

    monkeypatch.setattr(mixed, "measure_sensitivity", boom)
    args = {**TINY, **kw}
    with pytest.raises(LowbitError, match=needle):
        mixed_precision_recipe(tiny_llama, None, tiny_calib, **args)


def _fake_sensitivity(model, labels):
    """A sensitivity file for ``model`` with made-up losses (later layers more sensitive)."""
    from lowbit.analysis.sensitivity import target_linears

    layers = []
    for i, name in enumerate(target_linears(model)):
        opts = {lab: {"kl": (i + 1) * 4.0 ** -int(lab[1]), "proxy": 1.0, "ppl": 1.0} for lab in labels}
        layers.append({"name": name, "type": name.rsplit(".", 1)[-1], "block": 0, "kl": 0.0, "proxy": 0.0,
                       "options": opts})
    return {"kind": "sensitivity", "model": model_identity(model, "smollm2-135m"), "layers": layers,
            "candidates": [{"label": lab} for lab in labels], "eval": {"windows": 4, "seqlen": 128}}


@pytest.mark.model
def test_cli_target_bpw_with_stored_sensitivity(run_cli, smollm, tmp_path):
    model, _ = smollm
    write_results(tmp_path / "sens", "sensitivity", _fake_sensitivity(model, ["w3g64", "w4g64"]))
    code, out, err = run_cli("quantize", "smollm2-135m", "--target-bpw", "4.0", "--method", "rtn",
                             "--candidates", "3:64,4:64", "--sensitivity", str(tmp_path / "sens"),
                             "--nsamples", "2", "--seqlen", "64", "--json")
    assert code == 0, err
    report = json.loads(out)
    alloc = report["extra"]["mixed_precision"]
    assert alloc["sensitivity"]["reused"] and alloc["layers_allocated"] == 210
    assert alloc["counts"]["w3g64"] > 0 and alloc["counts"]["w4g64"] > 0
    # layers differ in size, so the budget is not met exactly; lowbit's own count agrees with the allocator's
    assert report["bits_per_weight"] <= 4.0
    assert report["bits_per_weight"] == pytest.approx(alloc["achieved_bpw"], rel=1e-12)
    assert report["recipe"]["name"] == f"rtn-mixed-{alloc['achieved_bpw']:.2f}bpw"


def test_summary_rows(tiny_llama, tiny_calib):
    _, summary = mixed_precision_recipe(tiny_llama, None, tiny_calib, method="rtn", target_bpw=4.0, **TINY)
    rows = dict(mixed.summary_rows(summary))
    assert rows["mixed precision"].startswith(f"target 4.0 bpw: {summary['achieved_bpw']:.4f} bpw")
    assert rows["layers per format"] == ", ".join(f"{k}: {v}" for k, v in summary["counts"].items() if v)
    assert rows["sensitivity"].startswith("measured in") and "4 x 32 tokens" in rows["sensitivity"]


def test_cli_errors(run_cli, clean_error, tmp_path):
    code, _, err = run_cli("quantize", "--target-bpw", "4", "--recipe", "gptq-w4g64")
    clean_error(code, err, "drop --recipe")
    code, _, err = run_cli("quantize", "--target-bpw", "4", "--activations", "A8_TOKEN")
    clean_error(code, err, "drop --activations")
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive
        run_cli("quantize", "--target-bpw", "4", "--target-mb", "30")
    assert exc.value.code == 2


@pytest.mark.model
def test_cli_budget_error_names_the_minimum(run_cli, clean_error, smollm):
    code, _, err = run_cli("quantize", "smollm2-135m", "--target-bpw", "3", "--candidates", "3:64,4:64",
                           "--nsamples", "2", "--seqlen", "64")
    clean_error(code, err, "below the smallest allocation the candidates allow: 3.5000 bpw", "w3g64")
