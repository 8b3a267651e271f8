"""Behaviour kept across the step-contract rewrite (issue 17): re-run the reference rows with each
benchmark's own script (same settings as when they were first recorded) and compare with the values
recorded at a git revision before the rewrite.

    python benchmarks/behaviour_kept.py                 # re-run every row, then write the table
    python benchmarks/behaviour_kept.py --table-only    # just compare what the JSONs hold now

Writes ``results/behaviour_kept.json`` and ``.md``.  Perplexity: smollm2-135m, first 10 WikiText-2 test
windows of 2048, calibration 128 x 512 WikiText-2 validation (seed 0).  Each benchmark runs its rows in
their own processes; run it on an otherwise idle machine (times are compared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _results import RESULTS, write_results

HERE = Path(__file__).resolve().parent
BEFORE_REV = "ed4f3c0"  # main before the rewrite (steps owning their statistics, typed layers, one STE)

# (label, results file, path to the row inside it, benchmark command that re-runs the row); the rows the issue
# names first
ROWS = [
    ("gptq-w4g64", "weight_only", ["gptq-w4g64"], ["weight_only.py", "--only", "gptq-w4g64"]),
    ("awq-w4g64", "weight_only", ["awq-w4g64"], ["weight_only.py", "--only", "awq-w4g64"]),
    ("awq-gptq-w3g64", "weight_only", ["awq-gptq-w3g64"], ["weight_only.py", "--only", "awq-gptq-w3g64"]),
    ("awq-gptq-w4g64", "weight_only", ["awq-gptq-w4g64"], ["weight_only.py", "--only", "awq-gptq-w4g64"]),
    ("w8a8-smoothquant", "activations", ["w8a8-smoothquant"], ["activations.py", "--only", "w8a8-smoothquant"]),
    ("w4a4-quarot", "activations", ["w4a4-quarot"], ["activations.py", "--only", "w4a4-quarot"]),
    ("KIVI4 (KV cache)", "kv_cache", ["ppl", "KIVI4"], ["kv_cache.py", "--only", "ppl", "--settings", "none", "KIVI4"]),
    ("mixed 3.5 bpw", "mixed_precision", ["rows", "mixed-3.50"], ["mixed_precision.py", "--redo", "mixed-3.50"]),
    ("gptq-w3g64", "weight_only", ["gptq-w3g64"], ["weight_only.py", "--only", "gptq-w3g64"]),
    ("awq-w3g64", "weight_only", ["awq-w3g64"], ["weight_only.py", "--only", "awq-w3g64"]),
]


def _row(data: dict | None, path: list[str]) -> dict | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _load(name: str, rev: str | None) -> dict | None:
    if rev is None:
        p = RESULTS / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None
    proc = subprocess.run(["git", "show", f"{rev}:benchmarks/results/{name}.json"], capture_output=True, text=True,
                          cwd=HERE)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _seconds(r: dict | None) -> float | None:
    return None if r is None else r.get("quant_seconds", r.get("seconds"))


def table() -> list[dict]:
    rows = []
    for label, name, path, _ in ROWS:
        old, new = _row(_load(name, BEFORE_REV), path), _row(_load(name, None), path)
        rows.append({"row": label, "ppl_before": None if old is None else old.get("perplexity"),
                     "ppl_now": None if new is None else new.get("perplexity"),
                     "seconds_before": _seconds(old), "seconds_now": _seconds(new),
                     "rerun": new is not None and new != old})  # a re-run always records new seconds
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for label, _, _, cmd in ROWS:
            print(f"== {label}: {' '.join(cmd)}", flush=True)
            subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=HERE, check=False)
    rows = table()
    lines = ["# Behaviour kept (issue 17)", "",f"Perplexity (10 x 2048 WikiText-2 test windows, 128 x 512 calibration) and quantization seconds "
             f"(KIVI4: evaluation seconds) before the step-contract rewrite (git {BEFORE_REV}) and now, each re-run "
             "by its own benchmark script with unchanged settings. Times are from different runs of the same 2-core "
             "machine; compare them only with the load noted in the commit that recorded them.", "",
             "| row | ppl before | s before | ppl now | s now |", "|---|---|---|---|---|"]
    for r in rows:
        now = f"{_f(r['ppl_now'], '.3f')} | {_f(r['seconds_now'], '.0f')}" if r["rerun"] else "not re-run | -"
        lines.append(f"| {r['row']} | {_f(r['ppl_before'], '.3f')} | {_f(r['seconds_before'], '.0f')} | {now} |")
    write_results("behaviour_kept", {"before_rev": BEFORE_REV, "rows": rows}, lines)


if __name__ == "__main__":
    main()
