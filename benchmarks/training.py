"""Training-based quantization on smollm2-135m (issue 18): block-wise QAT against the best PTQ at equal bits.

Each row quantizes with a shipped recipe in its own process (``weight_only.py --one``: calibration 128
random 512-token windows of WikiText-2 validation, seed 0, which are also Block-AP's training data;
evaluation on the first 10 WikiText-2 test windows of 2048) and records perplexity, wall time, training
tokens and optimizer steps.  The PTQ references are read from ``results/weight_only.json`` (same data,
same evaluation).  Finished rows are kept; ``--only NAME ...`` re-runs some.

    python benchmarks/training.py
    python benchmarks/training.py --only qat-block-w3g64
    python benchmarks/training.py --table-only

The other training benchmarks write their own results (``llm_qat.py``, ``finetune.py``, ``optim_states.py``);
``training.md`` ends with their tables, so the issue's must-shows read in one place.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _results import RESULTS, write_results

HERE = Path(__file__).resolve().parent
# row -> (bits, the PTQ rows at the same bits it must beat)
ROWS = {
    "qat-block-w3g64": (3, ["gptq-w3g64-asym", "owq-w3g64"]),
    "qat-block-w2g64": (2, []),
    "qat-block-w4g64": (4, ["gptq-w4g64-asym"]),
    "qat-block-e2e-w3g64": (3, ["gptq-w3g64-asym", "owq-w3g64"]),
}
PARTS = ["llm_qat", "finetune", "optim_states"]  # results/NAME.md of the other training benchmarks
CALIB_TOKENS = 128 * 512
BLOCKS = 30


def _run(name: str) -> dict | None:
    proc = subprocess.run([sys.executable, str(HERE / "weight_only.py"), "--one", name], capture_output=True,
                          text=True, cwd=HERE)
    if proc.returncode != 0:
        print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _options(name: str) -> dict:
    import yaml

    text = (HERE.parent / "src" / "lowbit" / "recipes" / f"{name}.yaml").read_text()
    return yaml.safe_load(text)["methods"][0]["options"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--table-only", action="store_true", help="rewrite training.md from the JSONs")
    args = parser.parse_args()
    path = RESULTS / "training.json"
    rows: dict = json.loads(path.read_text()) if path.exists() else {}
    for name in [] if args.table_only else args.only or list(ROWS):
        if name in rows and not args.only:
            continue
        r = _run(name)
        if r is None:
            continue
        opts = _options(name)
        epochs, e2e = int(opts["epochs"]), int(opts.get("e2e_steps", 0))
        r |= {"train_tokens_per_block": CALIB_TOKENS * epochs, "steps_per_block": epochs * 128 // 8,
              "steps": BLOCKS * epochs * 128 // 8 + e2e, "e2e_steps": e2e,
              "e2e_tokens": e2e * int(opts.get("e2e_batch", 4)) * 512}
        rows[name] = r
        print(f"{name}: ppl {r['perplexity']:.3f} in {r['quant_seconds']:.0f} s", flush=True)
    ptq = json.loads((RESULTS / "weight_only.json").read_text())
    lines = ["# Training-based quantization", "",
             "smollm2-135m, perplexity on the first 10 WikiText-2 test windows of 2048 (fp32: "
             f"{ptq['fp32']['perplexity']:.2f}). Block-AP trains on the calibration windows (128 x 512 WikiText-2 "
             "validation tokens, seed 0; batches of 8 windows, one optimizer step each), starting from round-to-nearest. "
             "Wall time is the whole quantization (start + training) on this 2-core CPU; the PTQ rows' times are "
             "from weight_only.json (other runs: compare ratios to its fp32 eval speed, given per row). The -e2e row adds "
             "E2E-QP: the scales alone trained end to end (next-token loss, batches of 4 calibration windows); its "
             "steps column counts those too.", "",
             "| row | bits | ppl | PTQ at equal bits | train tokens / block | steps (total) | wall s | eval tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (bits, refs) in ROWS.items():
        r = rows.get(name)
        if r is None:
            continue
        ref = ", ".join(f"{x} {ptq[x]['perplexity']:.2f}" for x in refs if x in ptq) or "GPTQ W2 collapses (~2000)"
        lines.append(f"| {name} | {bits} | {r['perplexity']:.2f} | {ref} | {r['train_tokens_per_block']} | "
                     f"{r['steps']} | {r['quant_seconds']:.0f} | {r['eval_tokens_per_s']:.0f} |")
    for part in PARTS:  # the other training benchmarks' tables, as they wrote them
        md = RESULTS / f"{part}.md"
        if md.exists():
            lines += ["", *("#" + x if x.startswith("#") else x for x in md.read_text().splitlines())]
    write_results("training", rows, lines)


if __name__ == "__main__":
    main()
