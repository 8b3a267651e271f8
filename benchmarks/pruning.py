"""Pruning on smollm2-135m (issue 19): magnitude, Wanda and SparseGPT at 50% and 2:4, OWL at 70%, pruning then
GPTQ W4 g64 and SparseGPT's joint mode, and llm-compressor's SparseGPT / Wanda on the same calibration.

Each row runs in its own process on the same calibration (128 random 512-token windows of WikiText-2 validation,
seed 0) and evaluation (the first 10 WikiText-2 test windows of 2048).  Per row: perplexity, the measured
fraction of exact zeros in the pruned linears, bits per weight stored dense (the report's) and in a bitmask
layout (1 bit per weight of mask plus the kept values and their scales: compressed-tensors' sparse-bitmask),
the time of the pruning / quantization step, and the fp32 eval tok/s of the same process as the machine's
speed reference.  The peers' rows run in their own venv (extra ``peers``, llmcompressor 0.14):

    python benchmarks/pruning.py                       # the default lowbit rows (~45 min on a 2-core CPU)
    /path/to/peers-venv/bin/python benchmarks/pruning.py --only llmcompressor-sparsegpt-50 llmcompressor-wanda-50

Writes ``results/pruning.json`` and ``pruning.md``; finished rows are kept, so re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import time

from _results import in_order, run_rows, table_lines, vs, write_results

MODEL = "smollm2-135m"


def _prune(method: str, **options) -> dict:
    return {"name": "r", "methods": [{"method": method, "ignore": ["lm_head"], "options": options}]}


def _then_gptq(first: dict) -> dict:
    return {"name": "r", "methods": [*first["methods"], {"method": "gptq", "spec": "W4_G64", "ignore": ["lm_head"]}]}


RECIPES: dict[str, dict | str] = {
    "magnitude-50": _prune("magnitude", sparsity=0.5),
    "wanda-50": _prune("wanda", sparsity=0.5),
    "sparsegpt-50": _prune("sparsegpt", sparsity=0.5),
    "magnitude-2of4": _prune("magnitude", pattern="2:4"),
    "wanda-2of4": _prune("wanda", pattern="2:4"),
    "sparsegpt-2of4": _prune("sparsegpt", pattern="2:4"),
    "wanda-70": _prune("wanda", sparsity=0.7),
    "wanda-70-owl": _prune("wanda", sparsity=0.7, owl=True),
    "sparsegpt-70": _prune("sparsegpt", sparsity=0.7),
    "sparsegpt-70-owl": _prune("sparsegpt", sparsity=0.7, owl=True),
    "gptq-w4g64": "gptq-w4g64",
    "sparsegpt-50+gptq-w4g64": _then_gptq(_prune("sparsegpt", sparsity=0.5)),
    "sparsegpt-50-joint-w4g64": "sparsegpt50-joint-w4g64",
    "sparsegpt-2of4+gptq-w4g64": "sparsegpt24-gptq-w4g64",
}
DEFAULT = [n for n in RECIPES if not n.startswith("sparsegpt-70")]  # the SparseGPT 70% rows: --only
PEERS = ["llmcompressor-sparsegpt-50", "llmcompressor-wanda-50", "llmcompressor-sparsegpt-2of4",
         "llmcompressor-wanda-2of4"]
ORDER = ["dense", *RECIPES, *PEERS]


def _llmcompressor(model, calib, name: str) -> None:
    """llm-compressor's own modifier on ``model`` in place (every decoder linear, lm_head left dense)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    _, method, how = name.split("-")
    structure = "2:4" if how == "2of4" else "0:0"
    cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    modifier = cls(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1])


def _sparsity(model) -> tuple[float, float]:
    """(fraction of exact zeros, number of weights) over the decoder's linear layers."""
    import torch

    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total, total


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Prune / quantize + evaluate one row in this process."""
    from lowbit.data import get_calibration
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model

    model, tok = load_model(MODEL)
    calib = get_calibration("wikitext2", tok, nsamples=args.nsamples, seqlen=512, seed=0)
    row: dict = {"config": name, "nsamples": args.nsamples}
    ref = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=1)  # this machine's speed, now
    row["fp32_eval_tokens_per_s"] = ref.tokens_per_s
    t0 = time.perf_counter()
    value_bits = 32.0
    if name.startswith("llmcompressor-"):
        _llmcompressor(model, calib, name)
    elif name != "dense":
        from lowbit.quantization import quantize

        report = quantize(model, RECIPES[name], calib, progress=False)
        row["dense_bits_per_weight"] = report.bits_per_weight
        value_bits = report.bits_per_weight if report.bits_per_weight < 32 else 32.0
    row["seconds"] = time.perf_counter() - t0
    sparsity, _ = _sparsity(model)
    row["sparsity"] = sparsity
    row.setdefault("dense_bits_per_weight", 32.0)
    # bitmask layout: 1 mask bit per weight, then only the kept values (codes with their share of scales)
    row["bitmask_bits_per_weight"] = 1 + (1 - sparsity) * value_bits if sparsity > 0 else None
    res = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows)
    row.update(perplexity=res.perplexity, windows=res.windows, eval_tokens_per_s=res.tokens_per_s,
               peak_rss_mb=peak_rss_mb())
    return row


def _lines(rows: dict) -> list[str]:
    dense = rows.get("dense", {}).get("perplexity")
    body = []
    for name, r in in_order(rows, ORDER):
        bm = f"{r['bitmask_bits_per_weight']:.2f}" if r.get("bitmask_bits_per_weight") else ""
        speed = r["fp32_eval_tokens_per_s"]
        body.append([name, f"{r['perplexity']:.2f}", vs(r["perplexity"], dense),
                     f"{r['sparsity']:.3f}", f"{r['dense_bits_per_weight']:.2f}", bm, f"{r['seconds']:.0f}",
                     f"{speed:.0f}", f"{r['seconds'] * speed / 1000:.0f}"])
    caption = [f"# Pruning on {MODEL} (WikiText-2 test, first 10 x 2048 windows)", "",
               "Calibration: 128 random 512-token windows of WikiText-2 validation, seed 0, for every row (the peers' too).",
               "sparsity: measured fraction of exact zeros in the decoder's linear weights (lm_head kept dense).",
               "dense bpw: bits per weight stored densely (32: fp32; W4 g64: 4 + scales); bitmask bpw: 1 mask bit per",
               "weight plus the kept values at the dense width (compressed-tensors' sparse-bitmask layout).",
               "time: the pruning / quantization step; ref tok/s: fp32 eval speed in the same process just before it",
               "(machines differ ~2x); time x ref: the step time in units of 1000 fp32-eval tokens, comparable across",
               "machines and runs."]
    header = ["config", "perplexity", "vs dense", "sparsity", "dense bpw", "bitmask bpw", "time s", "ref tok/s",
              "time x ref"]
    lines = table_lines(caption, header, body)
    lines += ["", "Paper reference (Wanda, LLaMA-2-7B, dense 5.12): magnitude / Wanda / SparseGPT 14.89 / 6.42 / 6.51 at "
              "50%, 54.59 / 11.02 / 10.17 at 2:4."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these rows (re-running them)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    todo = [] if args.table_only else (args.only or ["dense", *DEFAULT])
    rows = run_rows(__file__, "pruning", todo, bool(args.only), ["--nsamples", str(args.nsamples), "--windows",
                                                                 str(args.windows)], _lines)
    if args.table_only:
        write_results("pruning", rows, _lines(rows))

if __name__ == "__main__":
    main()
