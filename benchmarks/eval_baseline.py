"""fp32 baseline of smollm2-135m: perplexity, throughput and peak RSS on WikiText-2 test and PTB test.

Writes ``benchmarks/results/eval_baseline.json`` and ``eval_baseline.md``.

    python benchmarks/eval_baseline.py              # full splits (WikiText-2: 148 windows of 2048)
    python benchmarks/eval_baseline.py --max-windows 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.eval.perplexity import evaluate
from lowbit.models.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--datasets", nargs="*", default=["wikitext2", "ptb"])
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m")
    rows = []
    for name in args.datasets:
        r = evaluate(model, tok, name, "test", seqlen=2048, max_windows=args.max_windows, progress=True)
        rows.append(r.to_dict())
        print(f"{name}: ppl {r.perplexity:.4f} over {r.windows} windows, {r.tokens_per_s:.0f} tok/s, {r.seconds:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{args.max_windows}w" if args.max_windows else ""
    (RESULTS / f"eval_baseline{suffix}.json").write_text(json.dumps(
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}, indent=2))
    lines = ["# fp32 baseline, smollm2-135m (seqlen 2048, non-overlapping windows, GPTQ convention)", "",
             "| data | windows | tokens | perplexity | tokens/s | seconds | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['dataset']}/{r['split']} | {r['windows']} | {r['tokens']} | {r['perplexity']:.4f} | "
              f"{r['tokens_per_s']:.0f} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    (RESULTS / f"eval_baseline{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
