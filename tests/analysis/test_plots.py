"""lowbit.analysis.plots: figure contents and valid PNG files."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("matplotlib")

from lowbit.analysis import plots  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_rows() -> list[dict]:
    rows = []
    for method, base in (("rtn", 30.0), ("gptq", 22.0)):
        for bits, gs, bpw in ((4, 64, 4.5), (3, 64, 3.5), (4, 128, 4.25)):
            rows.append({"config": f"{method}-w{bits}g{gs}", "method": method, "bits": bits, "group_size": gs,
                         "bits_per_weight": bpw, "size_mb": 80.0 * bpw / 4, "perplexity": base * (5 - bits) ** 1.5,
                         "kl": 0.05 * (5 - bits), "top1": 0.9, "quant_seconds": 3.0, "peak_rss_mb": 900.0,
                         "status": "ok"})
    rows.append({"config": "awq-w2g64", "method": "awq", "bits": 2, "group_size": 64, "status": "failed",
                 "error": "out of memory"})
    return rows


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_ppl_figure_has_one_sorted_curve_per_method(tmp_path):
    fig = plots.ppl_vs_bpw_figure(sweep_rows(), fp_value=18.84)
    ax = fig.axes[0]
    curves = [l for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert sorted(l.get_label() for l in curves) == ["gptq", "rtn"]  # the failed awq row is skipped
    for line in curves:
        xs = list(line.get_xdata())
        assert xs == sorted(xs) == [3.5, 4.25, 4.5]
    gptq = next(l for l in curves if l.get_label() == "gptq")
    assert list(gptq.get_ydata()) == pytest.approx([22.0 * 2**1.5, 22.0, 22.0])
    ref = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
    assert len(ref) == 1 and list(ref[0].get_ydata()) == [18.84, 18.84]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gptq", "rtn"]
    path = plots.plot_ppl_vs_bpw(sweep_rows(), tmp_path / "p.png", fp_perplexity=18.84)
    assert path == tmp_path / "p.png" and _png_ok(path)


def test_ppl_figure_without_successful_rows_is_an_error():
    with pytest.raises(LowbitError, match="no successful sweep rows"):
        plots.ppl_vs_bpw_figure([{"config": "x", "method": "rtn", "status": "failed"}])
    nan_row = dict(sweep_rows()[0], perplexity=math.nan)
    with pytest.raises(LowbitError):
        plots.ppl_vs_bpw_figure([nan_row])


def sens_layers() -> list[dict]:
    out = []
    for block in (1, 0):  # given out of order on purpose
        for i, t in enumerate(("q_proj", "down_proj")):
            out.append({"name": f"model.layers.{block}.x.{t}", "type": t, "block": block,
                        "kl": 0.01 * (block + 1) * (i + 1), "proxy": 1.0})
    return out


def test_sensitivity_bars_in_depth_order_coloured_by_type(tmp_path):
    fig = plots.sensitivity_figure(sens_layers())
    ax = fig.axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == pytest.approx([0.01, 0.02, 0.02, 0.04])  # block 0 first
    assert bars[0].get_facecolor() == bars[2].get_facecolor() != bars[1].get_facecolor()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["q_proj", "down_proj"]
    assert _png_ok(plots.plot_sensitivity(sens_layers(), tmp_path / "s.png"))


def test_heatmap_pads_narrow_layers_and_merges_shared_inputs(tmp_path):
    acts = {
        "m.0.q_proj": {"type": "q_proj", "block": 0, "absmax": [1.0, 10.0, 100.0]},
        "m.0.k_proj": {"type": "k_proj", "block": 0, "absmax": [1.0, 10.0, 100.0]},
        "m.0.down_proj": {"type": "down_proj", "block": 0, "absmax": [1.0, 1.0, 1.0, 1000.0, 0.0]},
        "m.1.q_proj": {"type": "q_proj", "block": 1, "absmax": [1.0, 10.0, 100.0]},
    }
    labels, rows = plots.heatmap_rows(acts)
    assert labels == ["0:q_proj/k_proj", "0:down_proj", "1:q_proj"]
    fig = plots.activation_heatmap_figure(acts)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (3, 5)
    assert [float(v) for v in grid[0, :3]] == pytest.approx([0.0, 1.0, 2.0])
    assert grid.mask[0, 3] and grid.mask[0, 4]  # padded with NaN (masked)
    assert grid.mask[1, 4] and float(grid[1, 3]) == pytest.approx(3.0)  # absmax 0 -> blank
    assert _png_ok(plots.plot_activation_heatmap(acts, tmp_path / "h.png"))


def test_error_along_depth_figure(tmp_path):
    errors = [{"block": i, "rel_error": 0.01 * (i + 1), "cosine": 1 - 0.001 * i, "cosine_min": 0.9,
               "local_token_rel_error": 0.01} for i in range(4)]  # no token_rel_error: that curve is left out
    fig = plots.error_along_depth_figure(errors)
    lines = [l for ax in fig.axes for l in ax.get_lines()]
    assert [l.get_label() for l in lines] == ["relative error, all tokens (accumulated)",
                                              "relative error, mean per token (block alone)",
                                              "cosine (mean per token)"]
    assert list(lines[0].get_ydata()) == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert fig.axes[0].get_yscale() == "log"
    assert _png_ok(plots.plot_error_along_depth(errors, tmp_path / "e.png"))


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(LowbitError, match=r"pip install 'lowbit\[analysis\]'"):
        plots.ppl_vs_bpw_figure(sweep_rows())
