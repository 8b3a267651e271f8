"""``write_report``: turn the results of a directory (sweep / sensitivity / analysis) into PNG plots,
a Markdown report and a self-contained HTML report (images embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.analysis.sweep import TABLE_COLUMNS, data_line, table_rows
from lowbit.analysis.results import KINDS, read_results, results_path
from lowbit.atomic import write_text_atomic
from lowbit.errors import LowbitError

PLOTS_DIR = "plots"
TOP_SENSITIVE = 10


# ------------------------------------------------------------------ loading

def load_all(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every result kind present in ``results_dir``; LowbitError if none, or if they were measured on
    different models (fingerprints)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise LowbitError(f"{d} is not a directory; give the --out directory of 'lowbit sweep', "
                          "'lowbit quantize --target-bpw ... --sensitivity DIR' or 'lowbit analyze'")
    found = {k: r for k in KINDS if (r := read_results(d, k)) is not None}
    if not found:
        names = ", ".join(results_path(d, k).name for k in KINDS)
        raise LowbitError(f"no results in {d}: expected at least one of {names} (written by 'lowbit sweep', "
                          "'lowbit quantize --target-bpw ... --sensitivity DIR' or 'lowbit analyze')")
    prints = {k: r.get("model", {}).get("fingerprint") for k, r in found.items()}
    if len(set(prints.values())) > 1:
        detail = ", ".join(f"{k}.json: {r.get('model', {}).get('name')!r} ({prints[k]})" for k, r in found.items())
        raise LowbitError(f"results in {d} come from different models ({detail}); keep one model per results "
                          "directory (move or delete the stale files)")
    return found


# ------------------------------------------------------------------ pure helpers

def pareto_front(rows: Sequence[Mapping[str, Any]], metric: str = "perplexity") -> set[str]:
    """Configs not dominated by another row (no other row has bpw <= and ``metric`` <=, one strictly)."""
    front = set()
    for r in rows:
        b, m = r["bits_per_weight"], r[metric]
        dominated = any(o is not r and o["bits_per_weight"] <= b and o[metric] <= m
                        and (o["bits_per_weight"] < b or o[metric] < m) for o in rows)
        if not dominated:
            front.add(str(r["config"]))
    return front


def type_means(layers: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean of each key per layer type, in order of first appearance; ``n`` is the layer count."""
    out: dict[str, dict[str, float]] = {}
    for l in layers:
        t = out.setdefault(str(l["type"]), {"n": 0, **{k: 0.0 for k in keys}})
        t["n"] += 1
        for k in keys:
            t[k] += float(l[k]) if l.get(k) is not None else math.nan
    for t in out.values():
        for k in keys:
            t[k] /= t["n"]
    return out


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


# ------------------------------------------------------------------ document model

@dataclass
class Doc:
    """A report as blocks, rendered to Markdown or to self-contained HTML."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [[fmt(c) for c in r] for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "h2":
                out += [f"## {body}", ""]
            elif kind == "p":
                out += [body, ""]
            elif kind == "table":
                header, rows = body
                esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
                out.append("| " + " | ".join(esc[0]) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
                out.append("")
            elif kind == "img":
                path, alt = body
                out += [f"![{alt}]({path.relative_to(base).as_posix()})", ""]
        return "\n".join(out)

    def html(self) -> str:
        css = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
               "table{border-collapse:collapse;margin:0.5rem 0 1.5rem;font-size:0.9rem}"
               "th,td{border:1px solid #ccc;padding:0.2rem 0.5rem;text-align:right}"
               "th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
               "img{max-width:100%;height:auto;display:block;margin:0.5rem 0 1.5rem}")
        e = html.escape
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(self.title)}</title>",
               f"<style>{css}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, body in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(body)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(body)}</p>")
            elif kind == "table":
                header, rows = body
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</tbody></table>")
            elif kind == "img":
                path, alt = body
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">')
        out.append("</body></html>")
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------ sections

def _sweep_section(doc: Doc, sweep: Mapping[str, Any], plots: Path) -> None:
    from lowbit.analysis.plots import ok_rows, plot_ppl_vs_bpw, plot_ppl_vs_sparsity

    doc.heading("Quality vs size (sweep)")
    rows = sweep.get("rows", [])
    fp = sweep.get("fp") or {}
    fp_ppl = fp.get("perplexity")
    doc.para(data_line(dict(sweep.get("data") or {})))
    good = sorted(ok_rows(rows), key=lambda r: (str(r["method"]), r["bits_per_weight"]))
    if good:
        doc.table(TABLE_COLUMNS + ["Pareto"], table_rows(dict(sweep), pareto_front(good), failed=False))
        doc.para("Pareto: no other configuration is at most as large and at most as perplexed (one strictly).")
        doc.image(plot_ppl_vs_bpw(good, plots / "ppl_vs_bpw.png", fp_ppl), "perplexity vs bits per weight")
        if len(ok_rows(good, "kl")) == len(good):
            doc.image(plot_ppl_vs_bpw(good, plots / "kl_vs_bpw.png", None, metric="kl"), "KL vs bits per weight")
        if len({r.get("sparsity") or 0.0 for r in good}) > 1:
            doc.image(plot_ppl_vs_sparsity(good, plots / "ppl_vs_sparsity.png", fp_ppl), "perplexity vs sparsity")
    else:
        doc.para("No configuration of the sweep succeeded.")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        doc.para(f"{len(failed)} configuration(s) did not complete:")
        doc.table(["config", "status", "error"],
                  [[r.get("config"), r.get("status"), r.get("error", "")] for r in failed])


def _sensitivity_section(doc: Doc, sens: Mapping[str, Any], plots: Path) -> None:
    from lowbit.analysis.plots import plot_sensitivity

    layers = sens.get("layers", [])
    doc.heading(f"Per-layer sensitivity ({sens.get('bits', '?')}-bit)")
    if not layers:
        doc.para("No layers were measured.")
        return
    rho = sens.get("spearman_seeds")
    if rho is not None:
        doc.para(f"Rank stability across calibration seeds: Spearman rho = {fmt(float(rho), 3)}.")
    rho_proxy = sens.get("spearman_proxy")
    if rho_proxy is not None:
        doc.para(f"Agreement of the cheap proxy with the measured KL: Spearman rho = {fmt(float(rho_proxy), 3)}.")
    top = sorted(layers, key=lambda l: -float(l["kl"]))[:TOP_SENSITIVE]
    doc.para(f"The {len(top)} most sensitive layers (KL of the model's output when only that layer is quantized):")
    with_ppl = all("ppl" in l for l in top)
    doc.table(["layer", "type", "block", "KL", "proxy"] + (["perplexity"] if with_ppl else []),
              [[l["name"], l["type"], l.get("block"), l["kl"], l.get("proxy")] + ([l["ppl"]] if with_ppl else [])
               for l in top])
    means = type_means(layers, ["kl", "proxy"])
    doc.para("Mean per layer type:")
    doc.table(["type", "layers", "mean KL", "mean proxy"],
              [[t, int(m["n"]), m["kl"], m["proxy"]] for t, m in sorted(means.items(), key=lambda kv: -kv[1]["kl"])])
    doc.image(plot_sensitivity(layers, plots / "sensitivity.png"), "per-layer sensitivity")


def _analysis_section(doc: Doc, ana: Mapping[str, Any], plots: Path) -> None:
    from lowbit.analysis.plots import plot_activation_heatmap, plot_error_along_depth

    data = ana.get("data") or {}
    doc.heading("Activation outliers")
    doc.para(f"Per-input-channel absmax of every decoder linear over {data.get('tokens', '?')} calibration tokens "
             f"({data.get('nsamples', '?')} x {data.get('seqlen', '?')}"
             + (f", {data['source']}" if data.get("source") else "") + "); an outlier channel exceeds "
             f"{fmt(float(ana.get('outlier_factor', 6.0)), 3)} x the layer's median channel.")
    summary = ana.get("activation_summary") or {}
    if summary:
        doc.table(["layer type", "layers", "mean max/median", "max max/median", "mean kurtosis", "mean outliers",
                   "recurring outlier channels (layers)"],
                  [[t, s["layers"], s["mean_ratio"], s["max_ratio"], s["mean_kurtosis"], s["mean_outliers"],
                    ", ".join(f"{c} ({n})" for c, n in s["recurring_outliers"])] for t, s in summary.items()])
    acts = ana.get("activations") or {}
    if acts:
        worst = sorted(acts.items(), key=lambda kv: -float(kv[1]["ratio"]))[:5]
        doc.para("Largest max/median ratios:")
        doc.table(["layer", "max", "median", "max/median", "kurtosis", "outliers", "top channels"],
                  [[n, s["max"], s["median"], s["ratio"], s["kurtosis"], len(s["outliers"]),
                    ", ".join(str(c) for c in s.get("top", [])[:5])] for n, s in worst])
        doc.image(plot_activation_heatmap(acts, plots / "activation_heatmap.png"), "activation absmax heatmap")
    wsum = ana.get("weight_summary") or {}
    if wsum:
        doc.heading("Weight distributions")
        doc.table(["layer type", "layers", "mean kurtosis", "max kurtosis", "max absmax/std", "mean beyond 3σ",
                   "mean row absmax max/median"],
                  [[t, s["layers"], s["mean_kurtosis"], s["max_kurtosis"], s["max_absmax_over_std"],
                    s["mean_beyond_3sigma"], s["mean_row_spread"]] for t, s in wsum.items()])
        doc.para("Kurtosis is excess kurtosis (0 for a Gaussian; a Gaussian has 0.0027 of its mass beyond 3σ).")
    depth = ana.get("error_along_depth")
    if depth and depth.get("blocks"):
        blocks = depth["blocks"]
        doc.heading(f"Error along depth ({depth.get('quantized', 'quantized')} vs fp)")
        doc.para("Both models run on their own hidden states (accumulated error); 'block alone' feeds the quantized "
                 "block the fp inputs. The all-token relative error is dominated by the largest tokens (massive "
                 "activations); the per-token mean weighs every token alike.")
        doc.table(["block", "rel. error (all tokens)", "rel. error (per token)", "cosine", "min cosine",
                   "block alone: rel. error (per token)"],
                  [[b["block"], b["rel_error"], b.get("token_rel_error"), b["cosine"], b["cosine_min"],
                    b.get("local_token_rel_error")] for b in blocks])
        doc.image(plot_error_along_depth(blocks, plots / "error_along_depth.png"), "error along depth")


REPORT_FILES = ("report.md", "report.html")


def _check_targets(d: Path) -> None:
    """LowbitError before any plot is drawn when a report path is taken by something of another kind."""
    if (d / PLOTS_DIR).exists() and not (d / PLOTS_DIR).is_dir():
        raise LowbitError(f"{d / PLOTS_DIR} is a file; the report writes its plots there: move it away")
    for name in REPORT_FILES:
        if (d / name).is_dir():
            raise LowbitError(f"{d / name} is a directory; the report writes a file there: move it away")


def write_report(results_dir: str | Path) -> tuple[Path, Path]:
    """Render the plots into ``results_dir/plots/`` and write ``report.md`` and a self-contained
    ``report.html``; returns both paths."""
    d = Path(results_dir)
    found = load_all(d)
    model = next(iter(found.values())).get("model", {})
    doc = Doc(f"lowbit report: {model.get('name', 'model')}")
    params = model.get("params")
    doc.para(f"Model {model.get('name')!r}, fingerprint {model.get('fingerprint')}"
             + (f", {params:,} parameters" if isinstance(params, int) else "")
             + f". Results: {', '.join(f'{k}.json' for k in found)}.")
    plots = d / PLOTS_DIR
    _check_targets(d)
    plots.mkdir(exist_ok=True)
    if "sweep" in found:
        _sweep_section(doc, found["sweep"], plots)
    if "sensitivity" in found:
        _sensitivity_section(doc, found["sensitivity"], plots)
    if "analysis" in found:
        _analysis_section(doc, found["analysis"], plots)
    md, page = (d / name for name in REPORT_FILES)
    write_text_atomic(md, doc.markdown(d))
    write_text_atomic(page, doc.html())
    return md, page
