"""lowbit.analysis.report and the ``analyze`` / ``report`` command functions."""

from __future__ import annotations

import argparse
import base64
import copy
import re

import pytest
import torch

pytest.importorskip("matplotlib")

from lowbit.analysis.report import load_all, pareto_front, type_means, write_report  # noqa: E402
from lowbit.analysis.results import read_results, write_results  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402

MODEL = {"name": "smollm2-135m", "fingerprint": "abcdef0123456789", "params": 134515008}


def sweep() -> dict:
    rows = []
    for method, ppl in (("rtn", {4: 26.0, 3: 60.0}), ("gptq", {4: 21.0, 3: 30.0})):
        for bits in (4, 3):
            bpw = bits + 0.5
            rows.append({"config": f"{method}-w{bits}g64", "method": method, "bits": bits, "group_size": 64,
                         "bits_per_weight": bpw, "size_mb": 100.0 * bpw / 16, "perplexity": ppl[bits],
                         "kl": 0.01 * (5 - bits), "top1": 0.9, "quant_seconds": 2.0, "peak_rss_mb": 800.0,
                         "status": "ok"})
    rows.append({"config": "awq-w2g64", "method": "awq", "bits": 2, "group_size": 64, "status": "failed",
                 "error": "RuntimeError: boom | pipe"})
    data = {"calib": "wikitext2", "nsamples": 128, "seqlen": 512, "seed": 0, "eval_dataset": "wikitext2",
            "eval_seqlen": 2048, "eval_windows": 10}
    return {"kind": "sweep", "model": MODEL, "data": data,
            "fp": {"perplexity": 18.84, "bits_per_weight": 32.0, "size_mb": 513.1}, "rows": rows}


def sensitivity() -> dict:
    layers = []
    for block in range(3):
        for i, t in enumerate(("q_proj", "k_proj", "down_proj")):
            layers.append({"name": f"model.layers.{block}.m.{t}", "type": t, "block": block,
                           "kl": 0.001 * (block + 1) * (i + 1) ** 2, "proxy": 0.1 * (i + 1)})
    return {"kind": "sensitivity", "model": MODEL, "bits": 3, "layers": layers, "spearman_seeds": 0.93,
            "spearman_proxy": 0.5}


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_from_sweep_and_sensitivity(tmp_path):
    write_results(tmp_path, "sweep", sweep())
    write_results(tmp_path, "sensitivity", sensitivity())
    md, page = write_report(tmp_path)
    assert md == tmp_path / "report.md" and page == tmp_path / "report.html"
    text = md.read_text()
    # sweep table sorted by method then bits per weight; failed row listed apart
    configs = re.findall(r"^\| ((?:rtn|gptq)-w\dg64) \|", text, flags=re.M)
    assert configs == ["gptq-w3g64", "gptq-w4g64", "rtn-w3g64", "rtn-w4g64"]
    # sweep.md's table with a Pareto column; the unquantized reference row first
    assert "| fp | - | - | - | 0 | 32.000 | 513.1 | 18.840 | 0 | 100.0% | 0 | - |  |" in text
    assert "| gptq-w4g64 | gptq | 4 | 64 | 0 | 4.500 | 28.1 | 21.000 | 0.0100 | 90.0% | 2 | 800 | yes |" in text
    assert "| rtn-w3g64 | rtn | 3 | 64 | 0 | 3.500 | 21.9 | 60.000 | 0.0200 | 90.0% | 2 | 800 |  |" in text
    assert "first 10 windows of 2048 tokens of wikitext2 test" in text
    assert "RuntimeError: boom \\| pipe" in text
    assert "![perplexity vs bits per weight](plots/ppl_vs_bpw.png)" in text
    # top sensitive layer first; per-type means
    top = re.findall(r"^\| (model\.layers\.\d\.m\.\w+) \|", text, flags=re.M)
    assert top[0] == "model.layers.2.m.down_proj" and len(top) == 9
    assert "seeds: Spearman rho = 0.93" in text and "KL: Spearman rho = 0.5" in text
    for name in ("ppl_vs_bpw.png", "kl_vs_bpw.png", "sensitivity.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert "data:image/png;base64," in html
    images = _images(html)
    assert len(images) == 3 and all(i[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r'(href|src)="(?!data:)', html)  # nothing external
    assert "boom | pipe" in html  # escaped for Markdown only


def test_report_with_analysis_only(tmp_path, tiny_llama, tiny_calib):
    from lowbit.analysis.inspect import analyze_model
    from lowbit.quantization import quantize
    from lowbit.recipe import recipe_from_flags

    q = copy.deepcopy(tiny_llama)
    quantize(q, recipe_from_flags("rtn", 3, 16, True), tiny_calib, progress=False)
    write_results(tmp_path, "analysis", analyze_model(tiny_llama, tiny_calib[:4], "tiny", q, "rtn-w3g16"))
    md, page = write_report(tmp_path)
    text = md.read_text()
    assert "## Activation outliers" in text and "## Error along depth (rtn-w3g16 vs fp)" in text
    assert "| q_proj | 2 |" in text  # per-type outlier summary row
    assert len(_images(page.read_text())) == 2  # heatmap + error along depth
    assert not (tmp_path / "plots" / "ppl_vs_bpw.png").exists()


def test_report_rejects_mixed_models_and_empty_dirs(tmp_path):
    with pytest.raises(LowbitError, match="sweep.json, sensitivity.json, analysis.json"):
        write_report(tmp_path)
    write_results(tmp_path, "sweep", sweep())
    other = sensitivity() | {"model": MODEL | {"name": "other", "fingerprint": "0000000000000000"}}
    write_results(tmp_path, "sensitivity", other)
    with pytest.raises(LowbitError, match="different models"):
        load_all(tmp_path)
    with pytest.raises(LowbitError, match="not a directory"):
        write_report(tmp_path / "missing")
    assert not (tmp_path / "report.md").exists()


def test_pareto_front_and_type_means():
    rows = [{"config": "a", "bits_per_weight": 4.5, "perplexity": 20.0},
            {"config": "b", "bits_per_weight": 4.5, "perplexity": 22.0},   # dominated by a
            {"config": "c", "bits_per_weight": 3.5, "perplexity": 30.0},
            {"config": "d", "bits_per_weight": 5.0, "perplexity": 20.0}]   # dominated by a (smaller, as good)
    assert pareto_front(rows) == {"a", "c"}
    means = type_means([{"type": "q", "kl": 1.0, "proxy": 2.0}, {"type": "q", "kl": 3.0, "proxy": 4.0},
                        {"type": "o", "kl": 5.0, "proxy": None}], ["kl", "proxy"])
    assert means["q"] == {"n": 2, "kl": 2.0, "proxy": 3.0}
    assert means["o"]["kl"] == 5.0 and means["o"]["proxy"] != means["o"]["proxy"]  # NaN when missing


def _analyze_args(out, **kw) -> argparse.Namespace:
    base = dict(model="tiny", cache=None, calib="wikitext2", nsamples=4, seqlen=32, seed=0, batch_size=2,
                outlier_factor=6.0, quantized=None, out=str(out), dtype="float32", device="cpu",
                trust_remote_code=False)
    return argparse.Namespace(**(base | kw))


def test_cli_functions_parse_and_report(tmp_path, capsys):
    from lowbit.cli.analysis import add_analyze_parser, add_report_parser, cmd_report

    parser = argparse.ArgumentParser(prog="lowbit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_analyze_parser(sub)
    add_report_parser(sub)
    args = parser.parse_args(["analyze", "smollm2-135m", "--quantized", "rtn-w4g64", "--out", str(tmp_path)])
    assert (args.nsamples, args.seqlen, args.calib, args.quantized) == (16, 512, "wikitext2", "rtn-w4g64")
    assert args.func.__name__ == "cmd_analyze"
    write_results(tmp_path, "sweep", sweep())
    args = parser.parse_args(["report", str(tmp_path)])
    assert args.func is cmd_report and args.func(args) == 0
    assert "report.html" in capsys.readouterr().out



def test_cmd_analyze_quantizes_a_copy_with_a_recipe(tmp_path, tiny_llama, tiny_calib, monkeypatch, capsys):
    """The analyze command's plumbing on the tiny model: load -> calibrate -> recipe on a copy -> analysis.json."""
    from lowbit.cli import analysis as cli_analysis

    fp_before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    monkeypatch.setattr("lowbit.models.loading.load_model", lambda *a, **k: (tiny_llama, None))
    monkeypatch.setattr("lowbit.data.get_calibration",
                        lambda src, tok, n, seqlen, seed, model=None: tiny_calib[:n, :seqlen])
    assert cli_analysis.cmd_analyze(_analyze_args(tmp_path, quantized="rtn-w4g64")) == 0
    assert "last block vs rtn-w4g64" in capsys.readouterr().out
    res = read_results(tmp_path, "analysis")
    assert res["model"]["name"] == "tiny" and res["data"]["source"] == "wikitext2"
    depth = res["error_along_depth"]
    assert depth["quantized"] == "rtn-w4g64" and len(depth["blocks"]) == 2
    # measured 0.073 (block 0) and 0.123 (block 1) for RTN W4 g64 on the random model
    assert 0 < depth["blocks"][0]["rel_error"] < depth["blocks"][1]["rel_error"] < 0.2
    assert all(torch.equal(p, fp_before[n]) for n, p in tiny_llama.named_parameters())  # fp model untouched
    with pytest.raises(LowbitError, match="unknown recipe 'no-such-recipe'"):
        cli_analysis.cmd_analyze(_analyze_args(tmp_path, quantized="no-such-recipe"))
    write_results(tmp_path, "sweep", sweep())  # another model's results -> refused before any work
    with pytest.raises(LowbitError, match="use another results directory"):
        cli_analysis.cmd_analyze(_analyze_args(tmp_path))


def test_report_when_every_sweep_row_failed(tmp_path):
    data = sweep()
    for r in data["rows"]:
        r.update(status="failed", error="killed")
    write_results(tmp_path, "sweep", data)
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "No configuration of the sweep succeeded." in text
    assert "5 configuration(s) did not complete" in text
    assert not (tmp_path / "plots" / "ppl_vs_bpw.png").exists()
