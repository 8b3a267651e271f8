"""Figures of the trade-off analysis, drawn with matplotlib's Agg canvas (no display needed).

Each ``*_figure`` function builds and returns a ``matplotlib.figure.Figure`` (inspectable in
tests); each ``plot_*`` function builds the same figure, saves it as a PNG atomically and returns
the path.  Figures never go through ``pyplot``, so no global backend state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowbit.analysis.stats import absmax_values
from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError

DPI = 110


def _new_figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas; LowbitError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LowbitError("plots need matplotlib: pip install 'lowbit[analysis]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG (atomically) and return the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _log_y(ax: Any) -> None:
    """Log y axis labelled with plain numbers (20, 30, 40 rather than 2x10^1)."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def ok_rows(rows: Sequence[Mapping[str, Any]], metric: str = "perplexity") -> list[Mapping[str, Any]]:
    """Sweep rows that succeeded and have a finite ``metric`` and ``bits_per_weight``."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)
    return [r for r in rows if r.get("status") == "ok" and finite(r.get(metric)) and finite(r.get("bits_per_weight"))]


def ppl_vs_bpw_figure(rows: Sequence[Mapping[str, Any]], fp_value: float | None = None,
                      metric: str = "perplexity") -> Any:
    """One line per method: x = bits per weight, y = ``metric`` (log scale), points sorted by bpw;
    the fp model's value as a dashed horizontal line when given."""
    good = ok_rows(rows, metric)
    if not good:
        raise LowbitError(f"no successful sweep rows with a {metric}: nothing to plot")
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in good:
        by_method.setdefault(str(r["method"]), []).append(r)
    for method in sorted(by_method):
        pts = sorted(by_method[method], key=lambda r: (r["bits_per_weight"], r[metric]))
        ax.plot([r["bits_per_weight"] for r in pts], [r[metric] for r in pts], marker="o", label=method)
    if fp_value is not None and math.isfinite(fp_value) and fp_value > 0:
        ax.axhline(fp_value, color="black", linestyle="--", linewidth=1, label="_fp32")
        ax.annotate("fp32", xy=(1.0, fp_value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8)
    if all(r[metric] > 0 for r in good):
        _log_y(ax)
    ax.set_xlabel("bits per weight (scales and zeros included)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="method", fontsize=8)
    return fig


def plot_ppl_vs_bpw(sweep_rows: Sequence[Mapping[str, Any]], path: str | Path, fp_perplexity: float | None = None,
                    metric: str = "perplexity") -> Path:
    """``ppl_vs_bpw_figure`` saved as a PNG."""
    return save_figure(ppl_vs_bpw_figure(sweep_rows, fp_perplexity, metric), path)


def ppl_vs_sparsity_figure(rows: Sequence[Mapping[str, Any]], fp_value: float | None = None) -> Any:
    """One line per quantization (method, bits, group; "none": pruned only): x = sparsity, y = perplexity (log)."""
    good = ok_rows(rows)
    if not good:
        raise LowbitError("no successful sweep rows with a perplexity: nothing to plot")
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for r in good:
        key = "pruned only" if r["method"] == "none" else f"{r['method']} w{r['bits']} g{r.get('group_size') or 'ch'}"
        lines.setdefault(key, []).append(r)
    for key in sorted(lines):
        pts = sorted(lines[key], key=lambda r: r.get("sparsity") or 0.0)
        ax.plot([r.get("sparsity") or 0.0 for r in pts], [r["perplexity"] for r in pts], marker="o", label=key)
    if fp_value is not None and math.isfinite(fp_value) and fp_value > 0:
        ax.plot([0.0], [fp_value], marker="*", color="black", linestyle="none", label="fp32")
    if all(r["perplexity"] > 0 for r in good):
        _log_y(ax)
    ax.set_xlabel("sparsity (fraction of each layer's weights pruned)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_ppl_vs_sparsity(sweep_rows: Sequence[Mapping[str, Any]], path: str | Path,
                         fp_perplexity: float | None = None) -> Path:
    """``ppl_vs_sparsity_figure`` saved as a PNG."""
    return save_figure(ppl_vs_sparsity_figure(sweep_rows, fp_perplexity), path)


def _type_colours(types: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    unique = list(dict.fromkeys(types))
    return {t: cmap(i % 10) for i, t in enumerate(unique)}


def sensitivity_figure(layers: Sequence[Mapping[str, Any]], metric: str = "kl") -> Any:
    """One bar per layer ordered by depth (block, then the order given), coloured by layer type;
    log y scale when the values span more than two decades."""
    if not layers:
        raise LowbitError("no sensitivity layers to plot")
    ordered = sorted(enumerate(layers), key=lambda il: (il[1].get("block", 0), il[0]))
    items = [l for _, l in ordered]
    types = [str(l["type"]) for l in items]
    colours = _type_colours(types)
    values = [float(l[metric]) for l in items]
    fig = _new_figure(max(7.0, min(18.0, 0.06 * len(items) + 4)), 4.5)
    ax = fig.subplots()
    xs = [i + 0.6 * int(l.get("block", 0)) for i, l in enumerate(items)]  # a gap between blocks
    ax.bar(xs, values, color=[colours[t] for t in types], width=0.85)
    positive = [v for v in values if v > 0]
    if positive and min(positive) > 0 and len(positive) == len(values) and max(values) / min(positive) > 100:
        _log_y(ax)
    starts: dict[int, float] = {}
    for x, l in zip(xs, items):
        starts.setdefault(int(l.get("block", 0)), x)
    step = max(1, math.ceil(len(starts) / 16))
    ticks = [(pos, blk) for k, (blk, pos) in enumerate(sorted(starts.items())) if k % step == 0]
    ax.set_xticks([p for p, _ in ticks], [str(b) for _, b in ticks])
    ax.set_xlabel("decoder block")
    ax.set_ylabel(metric)
    ax.set_title(f"per-layer sensitivity ({metric} when only that layer is quantized)")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=t) for t, c in colours.items()], fontsize=8, loc="outside right upper")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def plot_sensitivity(layers: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "kl") -> Path:
    """``sensitivity_figure`` saved as a PNG."""
    return save_figure(sensitivity_figure(layers, metric), path)


def heatmap_rows(activation_stats: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[float]]]:
    """Labels and per-channel absmax rows in depth order; consecutive layers reading the same input
    (q/k/v, gate/up: identical absmax vectors) share one row labelled ``block:q_proj/k_proj/v_proj``.
    ``absmax`` may be a list or the string of ``lowbit.analysis.stats.encode_absmax``."""
    labels: list[str] = []
    rows: list[list[float]] = []
    last_block = None
    for st in activation_stats.values():
        block, kind, amax = st.get("block"), str(st["type"]), absmax_values(st)
        if rows and block == last_block and amax == rows[-1]:
            labels[-1] += f"/{kind}"
            continue
        labels.append(f"{block}:{kind}")
        rows.append(amax)
        last_block = block
    return labels, rows


def activation_heatmap_figure(activation_stats: Mapping[str, Mapping[str, Any]]) -> Any:
    """Layers (rows, depth order) x input channels (columns) of log10 absmax; layers narrower than
    the widest are padded with NaN (blank)."""
    import numpy as np

    labels, rows = heatmap_rows(activation_stats)
    if not rows:
        raise LowbitError("no activation statistics to plot")
    width = max(len(r) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        a = np.asarray(r, dtype=float)
        with np.errstate(divide="ignore"):
            grid[i, : len(a)] = np.where(a > 0, np.log10(np.where(a > 0, a, 1.0)), np.nan)
    fig = _new_figure(9.0, max(4.0, min(16.0, 0.05 * len(rows) + 2.5)))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma")
    fig.colorbar(im, ax=ax, label="log10 |x| max")
    step = max(1, math.ceil(len(labels) / 40))
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)
    ax.set_xlabel("input channel")
    ax.set_title("per-channel input absmax of the decoder linears")
    return fig


def plot_activation_heatmap(activation_stats: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """``activation_heatmap_figure`` saved as a PNG."""
    return save_figure(activation_heatmap_figure(activation_stats), path)


ERROR_SERIES = (  # (row key, legend label, line style) of error_along_depth_figure, drawn when present
    ("rel_error", "relative error, all tokens (accumulated)", {"marker": "o"}),
    ("token_rel_error", "relative error, mean per token (accumulated)", {"marker": "^"}),
    ("local_token_rel_error", "relative error, mean per token (block alone)", {"marker": "s", "linestyle": ":"}),
)


def error_along_depth_figure(errors: Sequence[Mapping[str, Any]]) -> Any:
    """Relative errors of the block outputs (``ERROR_SERIES`` present in the rows) on a log axis and
    the mean per-token cosine on a second axis, against block index."""
    if not errors:
        raise LowbitError("no error-along-depth rows to plot")
    blocks = [int(e["block"]) for e in errors]
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    drawn: list[float] = []
    for key, label, style in ERROR_SERIES:
        if all(key in e for e in errors):
            ys = [float(e[key]) for e in errors]
            ax.plot(blocks, ys, label=label, **style)
            drawn += ys
    if drawn and all(y > 0 for y in drawn):
        _log_y(ax)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("||fp - q|| / ||fp|| of the block output")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(blocks, [e["cosine"] for e in errors], color="tab:green", marker=".", label="cosine (mean per token)")
    ax2.set_ylabel("cosine")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    ax.set_title("quantization error along depth")
    return fig


def plot_error_along_depth(errors: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """``error_along_depth_figure`` saved as a PNG."""
    return save_figure(error_along_depth_figure(errors), path)
