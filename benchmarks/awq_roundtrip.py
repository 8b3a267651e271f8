"""AWQ W4 g64 on smollm2-135m through the whole user path on the command line: ``lowbit quantize --recipe awq-w4g64
--eval --out DIR --json`` (the run that used to crash after all its work on a non-JSON record), then ``lowbit eval
DIR``: the written checkpoint must evaluate to the in-memory perplexity.

    python benchmarks/awq_roundtrip.py [--work DIR]

Steps whose output is already in ``--work`` (quantize.json, eval.json) are not run again.  Writes
benchmarks/results/awq_roundtrip.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _results import table_lines, write_results


def _cli_json(args: list[str], save: Path) -> dict:
    """Run ``lowbit ARGS --json`` once (kept in ``save``) and return its JSON."""
    if not save.is_file():
        proc = subprocess.run([sys.executable, "-m", "lowbit.cli", *args, "--json"], stdout=subprocess.PIPE, text=True,
                              check=True)
        save.write_text(proc.stdout)
    return json.loads(save.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/lowbit-awq-roundtrip")
    ap.add_argument("--windows", type=int, default=10)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "awq-w4g64"
    q = _cli_json(["quantize", "smollm2-135m", "--recipe", "awq-w4g64", "--eval", "--max-windows", str(args.windows),
                   "--out", str(out), "--overwrite"], work / "quantize.json")
    e = _cli_json(["eval", str(out), "--max-windows", str(args.windows)], work / "eval.json")
    ev = q["extra"]["eval"]
    row = {"recipe": q["recipe"]["name"], "bits_per_weight": q["bits_per_weight"], "quant_seconds": q["seconds"],
           "fp32": ev["before"]["perplexity"], "in_memory": ev["after"]["perplexity"], "loaded": e["perplexity"],
           "format": q["extra"].get("format"), "eval_tokens_per_s_in_memory": ev["after"]["tokens_per_s"],
           "eval_tokens_per_s_loaded": e["tokens_per_s"], "windows": e["windows"]}
    rel = abs(row["loaded"] / row["in_memory"] - 1)
    lines = table_lines(
        [f"AWQ W4 g64 (symmetric) of smollm2-135m written with --out ({row['format']}), loaded back by `lowbit eval` "
         f"(WikiText-2 test, first {row['windows']} x 2048 windows; 128 x 512 calibration)."],
        ["fp32", "in memory", "loaded from --out", "relative difference", "bits/weight", "quantization s"],
        [[f"{row['fp32']:.4f}", f"{row['in_memory']:.6f}", f"{row['loaded']:.6f}", f"{rel:.1e}",
          f"{row['bits_per_weight']:.3f}", f"{row['quant_seconds']:.0f}"]])
    lines += ["", f"Same perplexity after the round trip: {'yes' if rel < 1e-5 else 'NO'}.",
              f"Evaluation speed: {row['eval_tokens_per_s_in_memory']:.0f} tok/s in memory (fake-quant fp32 weights) vs "
              f"{row['eval_tokens_per_s_loaded']:.1f} tok/s for the loaded packed checkpoint (two runs; the packed "
              "kernel choice is what issue 17 changes)."]
    write_results("awq_roundtrip", row, lines)


if __name__ == "__main__":
    main()
