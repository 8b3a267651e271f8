"""The k-bit trade-off on smollm2-135m: RTN, GPTQ, AWQ and HQQ at 8/4/3/2 bits (groups of 64), one
``lowbit sweep``, and the same small sweep on the local and the Ray executor.

Sections (``--only`` picks some; the sweep resumes where it stopped):

* ``full``: the sweep into ``benchmarks/results/sweep_smollm2/`` (``sweep.json``, ``sweep.md``, and the
  report with the perplexity-vs-bits plot when ``lowbit.analysis.report`` is available); calibration
  128 x 512 tokens of WikiText-2 validation (seed 0), evaluation on the first ``--windows`` windows of
  2048 of WikiText-2 test;
* ``executors``: RTN at 4 and 3 bits (16 x 512 calibration, 2 evaluation windows) once on local worker
  processes and once on a local Ray instance, rows compared field by field
  (``benchmarks/results/sweep_executors.json`` / ``.md``).

    python benchmarks/sweep.py --only full --windows 4
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


def run_full(windows: int) -> dict:
    from lowbit.analysis.executors import LocalExecutor
    from lowbit.analysis.sweep import SweepData, expand, run_sweep

    out = RESULTS / "sweep_smollm2"
    configs = expand(["rtn", "gptq", "awq", "hqq"], [8, 4, 3, 2], [64])
    sweep = run_sweep(MODEL, configs, out, LocalExecutor(1), SweepData(eval_windows=windows), threads=2)
    try:
        from lowbit.analysis.report import write_report
    except ImportError:
        return sweep
    write_report(out)
    return sweep


def run_executors() -> None:
    from lowbit.analysis.executors import LocalExecutor, RayExecutor
    from lowbit.analysis.sweep import SweepData, expand, run_sweep

    configs = expand(["rtn"], [4, 3], [64])
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
             "RTN W4/W3 g64 on smollm2-135m, calibration 16 x 512 WikiText-2 validation (seed 0), 2 evaluation",
             "windows of 2048 (WikiText-2 test); each configuration in a fresh process with 2 torch threads.", "",
             "| config | executor | " + " | ".join(COMPARED) + " |", "| --- | --- |" + " ---: |" * len(COMPARED)]
    for name, r in rows.items():
        for ex in ("local", "ray"):
            lines.append(f"| {name} | {ex} | " + " | ".join(f"{r[ex][k]:.6g}" for k in COMPARED) + " |")
    lines += ["", f"Same table from both executors (every compared field equal): {'YES' if same else 'NO'}"]
    write_results("sweep_executors", {"rows": rows, "identical": same}, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=["full", "executors"], help="run only these sections")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 2048 for the full sweep")
    args = parser.parse_args()
    sections = args.only or ["full", "executors"]
    if "full" in sections:
        run_full(args.windows)
    if "executors" in sections:
        run_executors()


if __name__ == "__main__":
    main()
