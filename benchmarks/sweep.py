"""The k-bit trade-off on smollm2-135m: RTN, GPTQ, AWQ and HQQ at 8/4/3/2 bits (groups of 64), one
``lowbit sweep``, and the same small sweep on the local and the Ray executor.

Sections (``--only`` picks some; the sweep resumes where it stopped):

* ``full``: the sweep into ``benchmarks/results/sweep_smollm2/`` (``sweep_smollm2_cuda/`` with
  ``--device cuda``): ``sweep.json``, ``sweep.md``, and the report with the perplexity-vs-bits plot;
  calibration 128 x 512 tokens of WikiText-2 validation (seed 0), evaluation on the first
  ``--windows`` windows of 2048 of WikiText-2 test;
* ``summary``: ``benchmarks/results/sweep.json`` / ``.md``: the CPU and the CUDA sweep side by side, and
  a check that each ``ppl_vs_bpw.png`` holds one drawn curve per method;
* ``executors``: RTN, GPTQ, AWQ and HQQ at 4 bits (16 x 512 calibration, 2 evaluation windows) once on local worker
  processes and once on a local Ray instance, rows compared field by field
  (``benchmarks/results/sweep_executors.json`` / ``.md``).

    python benchmarks/sweep.py --only full --windows 4
    python benchmarks/sweep.py --only full --windows 4 --device cuda --workers 2 --threads 8
    python benchmarks/sweep.py --only executors
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _results import RESULTS, write_results

MODEL = "smollm2-135m"
COMPARED = ["bits_per_weight", "size_mb", "perplexity", "kl", "top1"]


def run_full(windows: int, device: str = "cpu", workers: int = 1, threads: int = 2, redo: tuple[str, ...] = ()) -> dict:
    from lowbit.analysis.executors import LocalExecutor
    from lowbit.analysis.report import write_report
    from lowbit.analysis.sweep import SweepData, expand, run_sweep

    out = RESULTS / ("sweep_smollm2" if device == "cpu" else "sweep_smollm2_cuda")
    configs = expand(["rtn", "gptq", "awq", "hqq"], [8, 4, 3, 2], [64])
    sweep = run_sweep(MODEL, configs, out, LocalExecutor(workers), SweepData(eval_windows=windows), threads=threads,
                      device=device, redo=redo)
    write_report(out)
    return sweep


def check_plot(out: Path, rows: list[dict]) -> dict:
    """Does ``out/plots/ppl_vs_bpw.png`` hold one curve per method?  Counted twice: the labelled lines
    of the figure built from ``rows``, and each method's line colour among the PNG's rendered pixels."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    from lowbit.analysis.plots import ok_rows, ppl_vs_bpw_figure

    methods = sorted({r["method"] for r in ok_rows(rows, "perplexity")})
    ax = ppl_vs_bpw_figure(rows).axes[0]
    curves = {l.get_label(): l.get_color() for l in ax.get_lines() if not l.get_label().startswith("_")}
    png = imread(out / "plots" / "ppl_vs_bpw.png")[..., :3]
    pixels = {m: int((abs(png - to_rgb(colour)).max(axis=-1) < 0.02).sum()) for m, colour in curves.items()}
    ok = sorted(curves) == methods and all(n > 200 for n in pixels.values())
    return {"methods": methods, "curves": sorted(curves), "pixels_per_curve": pixels, "one_curve_per_method": ok}


def summarize() -> None:
    """``sweep.json`` / ``sweep.md``: the CPU sweep's table beside the same sweep on a CUDA GPU, when
    both result directories exist, and the plot check of each."""
    from lowbit.analysis.results import read_results

    dirs = {"cpu": RESULTS / "sweep_smollm2", "cuda": RESULTS / "sweep_smollm2_cuda"}
    sweeps = {k: read_results(d, "sweep") for k, d in dirs.items()}
    sweeps = {k: v for k, v in sweeps.items() if v is not None}
    if not sweeps:
        return
    checks = {k: check_plot(dirs[k], v["rows"]) for k, v in sweeps.items()}
    rows: dict[str, dict] = {}
    for dev, sweep in sweeps.items():
        for r in sweep["rows"]:
            if r.get("status") == "ok":
                rows.setdefault(r["config"], {"bits_per_weight": r["bits_per_weight"]})[dev] = {
                    k: r[k] for k in ("perplexity", "kl", "top1", "quant_seconds", "peak_rss_mb")}
    devs = list(sweeps)
    first = next(iter(sweeps.values()))
    lines = ["# Sweep: RTN, GPTQ, AWQ, HQQ at 8/4/3/2 bits (groups of 64) on smollm2-135m", "",
             f"Calibration 128 x 512 tokens of WikiText-2 validation (seed 0); evaluation on the first "
             f"{first['data']['eval_windows']} windows of 2048 of WikiText-2 test (fp32 perplexity "
             f"{first['fp']['perplexity']:.3f}). Asymmetric integer weights, an fp32 scale and a b-bit zero per "
             "group (HQQ: an fp16 fractional zero). Full tables and the plots: `sweep_smollm2/` (this machine's 2 CPU "
             "cores, one configuration at a time) and `sweep_smollm2_cuda/` (an H100, two configurations at a "
             "time sharing it, 8 CPU threads each). 'quant s' includes one pass of the calibration windows through "
             "the model for every method, RTN and HQQ too: lowbit measures each layer's output error.", "",
             "| config | bits/weight | " + " | ".join(f"ppl {d} | KL {d} | quant s {d}" for d in devs) + " |",
             "| --- | ---: |" + " ---: | ---: | ---: |" * len(devs)]
    for name in sorted(rows, key=lambda n: (n.split("-")[0], rows[n]["bits_per_weight"])):
        r = rows[name]
        cells = []
        for d in devs:
            v = r.get(d)
            cells += [f"{v['perplexity']:.4g}", f"{v['kl']:.4f}", f"{v['quant_seconds']:.0f}"] if v else ["", "", ""]
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | " + " | ".join(cells) + " |")
    lines += [""]
    for d, c in checks.items():
        lines.append(f"Plot check ({d}): `ppl_vs_bpw.png` has {len(c['curves'])} curves ({', '.join(c['curves'])}) for "
                     f"{len(c['methods'])} methods, each drawn ({', '.join(f'{m} {n} px' for m, n in c['pixels_per_curve'].items())}): "
                     f"{'YES' if c['one_curve_per_method'] else 'NO'}")
    write_results("sweep", {"rows": rows, "plot_checks": checks,
                            "fp_perplexity": {d: s["fp"]["perplexity"] for d, s in sweeps.items()}}, lines)


def run_executors() -> None:
    from lowbit.analysis.executors import LocalExecutor, RayExecutor
    from lowbit.analysis.sweep import SweepData, expand, run_sweep

    configs = expand(["rtn", "gptq", "awq", "hqq"], [4], [64])
    data = SweepData(nsamples=16, eval_windows=2)
    tmp = Path(tempfile.mkdtemp())
    try:
        local = run_sweep(MODEL, configs, tmp / "local", LocalExecutor(1), data, threads=2)
        ray = run_sweep(MODEL, configs, tmp / "ray", RayExecutor(cpus=2, local_cpus=2), data, threads=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {}
    for name in (c.name for c in configs):
        a = next(r for r in local["rows"] if r["config"] == name)
        b = next(r for r in ray["rows"] if r["config"] == name)
        rows[name] = {"local": {k: a[k] for k in COMPARED}, "ray": {k: b[k] for k in COMPARED},
                      "identical": all(a[k] == b[k] for k in COMPARED)}
    same = all(r["identical"] for r in rows.values())
    lines = ["# Sweep executors: local worker processes vs a local Ray instance", "",
             "RTN, GPTQ, AWQ and HQQ W4 g64 on smollm2-135m, calibration 16 x 512 WikiText-2 validation (seed 0), 2 evaluation",
             "windows of 2048 (WikiText-2 test); each configuration in a fresh process with 2 torch threads.", "",
             "| config | executor | " + " | ".join(COMPARED) + " |", "| --- | --- |" + " ---: |" * len(COMPARED)]
    for name, r in rows.items():
        for ex in ("local", "ray"):
            lines.append(f"| {name} | {ex} | " + " | ".join(f"{r[ex][k]:.6g}" for k in COMPARED) + " |")
    lines += ["", f"Same table from both executors (every compared field equal): {'YES' if same else 'NO'}"]
    write_results("sweep_executors", {"rows": rows, "identical": same}, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=["full", "summary", "executors"], help="run only these sections")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 2048 for the full sweep")
    parser.add_argument("--device", default="cpu", help="device of the full sweep (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=1, help="configurations at once in the full sweep")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per configuration")
    parser.add_argument("--redo", nargs="*", default=[], help="configurations or methods of the full sweep to run again")
    args = parser.parse_args()
    sections = args.only or ["full", "summary", "executors"]
    if "full" in sections:
        run_full(args.windows, args.device, args.workers, args.threads, tuple(args.redo))
    if "summary" in sections:
        summarize()
    if "executors" in sections:
        run_executors()


if __name__ == "__main__":
    main()
