"""lm-evaluation-harness on lowbit models (issue 21): the offline ``wikitext_lastword`` task for fp32, GPTQ W4 g64
and RTN W3 g64 through ``lowbit eval --tasks``'s adapter, and fp32 through lm-eval's own HF model class on the
same checkpoint directory (the agreement check).

Each row quantizes smollm2-135m in its own process (calibration: 128 random 512-token windows of WikiText-2
validation, seed 0), saves and reloads the checkpoint through lowbit, then runs the first ``--limit`` examples of
``wikitext_lastword`` (LAMBADA-style last-word prediction on WikiText-2 test paragraphs; accuracy of the greedy
word and its perplexity, lm-eval's own metrics and standard errors).

    python benchmarks/lm_eval_tasks.py [--only fp32 gptq-w4g64] [--limit 500]

Writes ``results/lm_eval.json`` and ``lm_eval.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _results import rows_main, table_lines

MODEL = "smollm2-135m"
ROWS = ["fp32", "gptq-w4g64", "rtn-w3g64", "fp32-lm-eval-hf"]


def run_one(name: str, args: argparse.Namespace) -> dict:
    from lowbit.data import get_calibration
    from lowbit.eval.harness import harness_lm, resolve_tasks, run_tasks
    from lowbit.models.loading import load_model, resolve_model
    from lowbit.quantization import quantize, save_quantized

    tasks, folders = resolve_tasks(["wikitext_lastword"])
    row: dict = {"config": name, "limit": args.limit}
    if name == "fp32-lm-eval-hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(resolve_model(MODEL).path), device="cpu", batch_size=8, dtype="float32")
    else:
        model, tok = load_model(MODEL)
        if name != "fp32":
            report = quantize(model, name, get_calibration("wikitext2", tok, nsamples=128, seqlen=512, seed=0),
                              progress=False)
            row["bits_per_weight"] = report.bits_per_weight
            out, row["format"] = save_quantized(model, tok, report, Path(tempfile.mkdtemp()) / name)
            model, tok = load_model(out)  # what a user evaluates: the saved checkpoint
        lm = harness_lm(model, tok, batch_size=8)
    t0 = time.perf_counter()
    row.update(run_tasks(lm, tasks, folders, limit=args.limit)["wikitext_lastword"])
    row["seconds"] = time.perf_counter() - t0
    return row


def _lines(rows: dict) -> list[str]:
    body = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        body.append([name, r.get("format", "fp32"), f"{r['acc']:.4f} +- {r['acc_stderr']:.4f}",
                     f"{r['perplexity']:.2f}", f"{int(r['sample_len'])}", f"{r['seconds']:.0f}"])
    caption = [f"# lm-eval `wikitext_lastword` on {MODEL}", "",
               "LAMBADA-style last-word prediction on WikiText-2 test paragraphs (built offline by lowbit), first",
               "`--limit` examples; acc: the word is the greedy continuation (lm-eval's `acc`, its standard error);",
               "perplexity of the word. lowbit rows: the checkpoint saved and reloaded by lowbit, run through",
               "`lowbit eval --tasks`'s adapter; fp32-lm-eval-hf: lm-eval's own HFLM on the same fp32 directory."]
    lines = table_lines(caption, ["config", "checkpoint", "acc", "word perplexity", "examples", "seconds"], body)
    fp, hf = rows.get("fp32"), rows.get("fp32-lm-eval-hf")
    if fp and hf:
        lines += ["", f"Agreement: lowbit adapter vs lm-eval HFLM on fp32: acc {fp['acc']:.4f} vs {hf['acc']:.4f}, "
                      f"perplexity {fp['perplexity']:.4f} vs {hf['perplexity']:.4f}."]
    order = [rows[n]["acc"] for n in ("fp32", "gptq-w4g64", "rtn-w3g64") if n in rows]
    if len(order) == 3:
        ok = order[0] >= order[1] >= order[2]
        lines += [f"Ordering fp32 >= GPTQ W4 >= RTN W3 by accuracy: {'yes' if ok else 'NO'} "
                  f"({' / '.join(f'{a:.4f}' for a in order)})."]
    return lines


def main() -> None:
    rows_main(__file__, __doc__, "lm_eval", ROWS, run_one, _lines, {"--limit": (int, 500)})


if __name__ == "__main__":
    main()
