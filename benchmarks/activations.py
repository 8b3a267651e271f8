"""Activation quantization benchmark on smollm2-135m: W8A8 / W4A4 / FP8 methods side by side.

Every configuration is a shipped recipe, run in its own process on the same calibration (128
random 512-token windows of WikiText-2 validation, seed 0) and evaluated on the first 10
WikiText-2 test windows of 2048 (``--windows`` to change).  Results go to
``benchmarks/results/activations.json`` and ``activations.md``; finished rows are kept, so
re-running resumes (``--only NAME ...`` re-runs those).  With llm-compressor installed (extra
``peers``), its SmoothQuant + W8A8 runs on the same data.

    python benchmarks/activations.py
    python benchmarks/activations.py --only w8a8-smoothquant
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _results import RESULTS, claim_lines, in_order, vs, write_results

CONFIGS = ["w8a8-static", "w8a8-rptq", "w8a8-olive", "w8a8-rtn", "w8a8-zeroquant", "w8a8-smoothquant-a05",
           "w8a8-smoothquant", "w8a8-smoothquant-static", "w8a8-os-plus", "w8a8-fp8", "w8a8-llmint8", "w4a8-zeroquant-rtn",
           "w4a8-zeroquant", "w4a8-qoq", "w4a8-zeroquant-fp", "w4a4-rtn", "w4a4-olive", "w4a4-quarot-rtn", "w4a4-quarot",
           "w4a4-atom", "w4a16-nvfp4"]
PEERS = ["llmcompressor-smoothquant-w8a8"]
# The paper claims the issue asks to see, as (row, comparison, target) read off the measured rows.
CLAIMS = [
    ("w8a8-static", "naive static per-tensor W8A8 degrades perplexity measurably (> +1%)", lambda r: r > 1.0),
    ("w8a8-smoothquant", "SmoothQuant W8A8 within 1% of fp32", lambda r: r <= 1.0),
    ("w8a8-smoothquant-static", "SmoothQuant W8A8, static per-tensor inputs, within 1% of fp32", lambda r: r <= 1.0),
    ("w8a8-llmint8", "LLM.int8() within 0.5% of fp32", lambda r: r <= 0.5),
    ("w8a8-fp8", "FP8 E4M3 W8A8 within 1% of fp32", lambda r: r <= 1.0),
]
# (row, baseline row, claim): the row must be at least twice as close to fp32 as the baseline
PAIRED_CLAIMS = [
    ("w8a8-rptq", "w8a8-static", "RPTQ's per-cluster static ranges far better than one static range per tensor"),
    ("w8a8-olive", "w8a8-static", "OliVe's outlier-victim pairs far better than plain int8 at the same granularity"),
    ("w4a4-olive", "w4a4-rtn", "OliVe W4A4 (static inputs) far better than plain W4A4 with dynamic per-token inputs"),
    ("w4a8-zeroquant", "w4a8-zeroquant-rtn", "ZeroQuant's layer-by-layer distillation far better than without"),
]


NOTES = [
    "Notes. This 135M model is harder on activations than the 7B+ models the papers measured: dynamic",
    "per-token W8A8 with no outlier handling already costs +3.4% here (+0.24% of it from the int8 weights:",
    "RTN W8 alone measured 22.79 vs 22.73 on 3 windows). SmoothQuant cuts that to +1.1% (alpha searched",
    "per group; the paper's alpha 0.5 on the norm-fed inputs: +1.9%) and rescues static per-tensor inputs",
    "(47.9 -> 20.6). LLM.int8()'s threshold 6.0 was tuned for models where outlier features are few and",
    "huge; here they are many and moderate. FP8 E4M3's 3 mantissa bits cost as much as int8 per token",
    "(FP8 weights alone measured +1.8% on 3 windows). W4A4: rotation turns an unusable model (6032) into",
    "a poor one (QuaRot-RTN 254, QuaRot-GPTQ 46.7); Atom's 8-bit outlier channels do better still.",
    "RPTQ's 32 static ranges per input beat even dynamic per-token ranges here (+1.1% vs +3.4%); OliVe's",
    "pairs halve static int8's loss but a pruned victim per outlier still costs (+21%); ZeroQuant's LKD",
    "(32 Adam steps per block against the fp block) halves W4A8's loss (+48.8% -> +23.3%). OliVe W4A4",
    "(static per-tensor inputs) is far less broken than plain W4A4 but still unusable (1700). ZeroQuant-FP",
    "W4A8 (FP4 E2M1 weights, power-of-two scales, rank-8 LoRC, FP8 inputs: 30.3) lands beside INT4 RTN W4A8",
    "(29.6). w4a8-qoq (42.6) is worse than plain RTN W4A8, and the Hadamard rotation is why: this model's",
    "linear weights are dequantized Q4_1 (groups of 32), so unrotated they sit almost on a 4-bit grid that",
    "round-to-nearest g64 partly recovers, while rotated weights are generic. Measured on the same data:",
    "RTN W4 g64 asym weights alone 26.35 unrotated vs 39.67 after the QuaRot rotation; QoQ W4A8 without",
    "rotation and smoothing 26.28 (beside the 29.64 of ZeroQuant RTN W4A8). The shipped w4a8-qoq keeps the",
    "paper's rotation + smoothing; this model cannot show what they gain on ordinary fp weights (the same",
    "grid loss also weighs on the QuaRot W4A4 rows).",
    "llm-compressor's SmoothQuant (strength 0.5) + W8A8 (int8 weights per channel, dynamic per-token int8",
    "inputs) on the same calibration: 20.423 (+2.52%), against lowbit's 20.142 (searched alpha) and 20.299",
    "(alpha 0.5).",
]


def _llmcompressor_smoothquant(model, calib) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    recipe = [SmoothQuantModifier(smoothing_strength=0.5),
              QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1])


def run_one(name: str, windows: int, nsamples: int) -> dict:
    """Quantize + evaluate one configuration in this process."""
    from lowbit.data import get_calibration
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, tok = load_model("smollm2-135m")
    calib = get_calibration("wikitext2", tok, nsamples=nsamples, seqlen=512, seed=0)
    row: dict = {"config": name}
    t0 = time.perf_counter()
    if name == "llmcompressor-smoothquant-w8a8":
        _llmcompressor_smoothquant(model, calib)
        row["bits_per_weight"] = 8 + 32 / 576
    elif name != "fp32":
        report = quantize(model, name, calib, progress=False)
        row["bits_per_weight"] = report.bits_per_weight
        row["activations"] = report.recipe["methods"][0].get("activations")
        row["transforms"] = report.extra.get("transforms")
    else:
        row["bits_per_weight"] = 32.0
    row["quant_seconds"] = time.perf_counter() - t0
    res = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=windows)
    row.update(perplexity=res.perplexity, windows=res.windows, eval_tokens_per_s=res.tokens_per_s,
               peak_rss_mb=peak_rss_mb())
    return row


INPUT_LABELS = {  # methods that quantize inputs their own way (no activation spec in the recipe)
    "llmcompressor-smoothquant-w8a8": "int8 dynamic per-token (llm-compressor)",
    "w8a8-llmint8": "int8 per token, columns >= 6.0 in fp32",
    "w4a16-nvfp4": "fp32",
    "w4a4-atom": "int4 per token-group of 64 + 32 int8 outlier channels",
    "w8a8-rptq": "int8 static, one range per channel cluster (32)",
    "w8a8-olive": "int8 static per-tensor, outlier-victim pairs",
    "w4a4-olive": "int4 static per-tensor, outlier-victim pairs",
}


def _act_label(name: str, spec: dict | None) -> str:
    if name in INPUT_LABELS:
        return INPUT_LABELS[name]
    if not spec:
        return "fp32"
    fmt = spec["fmt"] or f"int{spec['bits']}"
    return f"{fmt} {'dynamic per-' + spec['granularity'] if spec['dynamic'] else 'static per-' + spec['granularity']}"


def write_tables(rows: dict[str, dict], windows: int) -> None:
    fp = rows.get("fp32", {}).get("perplexity")
    lines = [f"# Activation quantization on smollm2-135m (WikiText-2 test, first {windows} x 2048 windows)", "",
             "Calibration: 128 random 512-token windows of WikiText-2 validation, seed 0. Activations are fake-quantized",
             "on the inputs of every decoder linear (lm_head stays fp32). Weight bits include scales. Quantization",
             "times were taken while other jobs shared the 2 cores: upper bounds.", "",
             "| config | weights bits | inputs | perplexity | vs fp32 | quant time s |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for name, r in in_order(rows, ["fp32", *CONFIGS, *PEERS]):
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {_act_label(name, r.get('activations'))} | "
                     f"{r['perplexity']:.3f} | {vs(r['perplexity'], fp)} | {r['quant_seconds']:.0f} |")
    if fp:
        lines += ["", "Claims (from the issue), read off the rows above:"]
        lines += claim_lines(rows, fp, CLAIMS)
        for name, base, text in PAIRED_CLAIMS:
            if name in rows and base in rows:
                a, b = rows[base]["perplexity"] / fp - 1, rows[name]["perplexity"] / fp - 1
                lines.append(f"- {text}: {'yes' if b < a / 2 else 'NO'} ({100 * b:+.2f}% vs {100 * a:+.2f}%)")
        if "w4a4-rtn" in rows and "w4a4-quarot" in rows:
            a, b = rows["w4a4-rtn"]["perplexity"], rows["w4a4-quarot"]["perplexity"]
            lines.append(f"- W4A4 with rotation far better than without: {'yes' if b < a / 2 else 'NO'} ({b:.2f} vs {a:.2f})")
    lines += ["", *NOTES]
    write_results("activations", rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these configurations")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.windows, args.nsamples)))
        return
    path = RESULTS / "activations.json"
    rows: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    try:
        import llmcompressor  # noqa: F401
        peers = PEERS
    except ImportError:
        peers = []
    for name in args.only or ["fp32", *CONFIGS, *peers]:
        if name in rows and not args.only:
            continue
        cmd = [sys.executable, __file__, "--one", name, "--windows", str(args.windows), "--nsamples", str(args.nsamples)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:28s} ppl {rows[name]['perplexity']:8.3f}", flush=True)
        write_tables(rows, args.windows)


if __name__ == "__main__":
    main()
