"""Weight-only PTQ benchmark on smollm2-135m: perplexity, quantization time and peak RSS per config.

Each configuration runs in its own process (so peak RSS is its own) on the same calibration
(128 random 512-token windows of WikiText-2 validation, seed 0) and the same evaluation
windows (WikiText-2 test: the first 10 windows of 2048 in quick mode, the full split in full
mode).  Results go to ``benchmarks/results/weight_only.json`` and ``weight_only.md``; finished
configurations are kept, so re-running resumes.  With llm-compressor installed (extra
``peers``), its GPTQ and RTN W4 g64 run on the same data in the same way.

    python benchmarks/weight_only.py                       # quick mode, every config
    python benchmarks/weight_only.py --only gptq-w4g64 rtn-w4g64
    python benchmarks/weight_only.py --full
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# smollm2-135m's hidden size 576 is not a multiple of 128: "g128" configurations use g64 here.
_SYM = ("rtn", "gptq", "awq")  # HQQ and OWQ recipes are asymmetric (zero point per group) by design
CONFIGS = [f"{m}-w{b}g64" for b in (4, 3) for m in _SYM]
CONFIGS += [f"{m}-w{b}g64-asym" for b in (4, 3) for m in _SYM] + [f"{m}-w{b}g64" for b in (4, 3) for m in ("hqq", "owq")]
CONFIGS += ["spqr-4bit", "spqr-3bit"]
CONFIGS += ["awq-gptq-w4g64", "awq-gptq-w3g64"]  # staged: AWQ's scales and clipping, then GPTQ's rounding
PEERS = ["llmcompressor-rtn-w4g64", "llmcompressor-gptq-w4g64"]
HQQ_PEERS = ["hqq-lib-w4g64", "hqq-lib-w3g64"]  # the hqq library (extra peers), its BaseQuantizeConfig defaults
# Measured on this machine by the issue author (10 windows x 2048, same calibration).
REFERENCE = {"fp32": 19.92, "llmcompressor-rtn-w4g64": 27.83, "llmcompressor-gptq-w4g64": 25.40}


def _llmcompressor(model, calib, scheme: str) -> None:
    """Run llm-compressor's own modifier on ``model`` in place (W4A16 symmetric, group 64)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    config = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                              "strategy": "group", "group_size": 64}}}
    modifier = (GPTQModifier if scheme == "gptq" else QuantizationModifier)(config_groups=config, ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1])


def _hqq_library(model, bits: int) -> None:
    """The ``hqq`` library's own quantizer on every decoder linear of ``model``, in place: BaseQuantizeConfig's
    defaults (group 64 along the input dimension, axis 1; zero rounded at 4 bits only; its proximal solver),
    the dequantized weights written back (fp16 scale and zero stored: 4 + 32/64 bits per weight)."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=bits, group_size=64)["weight_quant_params"]
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            codes, meta = Quantizer.quantize(m.weight.data, device="cpu", bitpack=False, **params)
            w = (codes.float() - meta["zero"].half().float()) * meta["scale"].half().float()
            m.weight.data.copy_(w.reshape(meta["shape"]))


def run_one(name: str, windows: int | None, nsamples: int) -> dict:
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
    if name.startswith("llmcompressor-"):
        _llmcompressor(model, calib, name.split("-")[1])
        row["bits_per_weight"] = 4 + 16 / 64  # fp16 scale per 64 weights, symmetric
    elif name.startswith("hqq-lib-"):
        bits = int(name.split("-w")[1][0])
        _hqq_library(model, bits)
        row["bits_per_weight"] = bits + 32 / 64  # fp16 scale and zero per 64 weights
    elif name != "fp32":
        report = quantize(model, name, calib, progress=False)
        row["bits_per_weight"] = report.bits_per_weight
        row["mean_output_error"] = report.mean_output_error()
    else:
        row["bits_per_weight"] = 32.0
    row["quant_seconds"] = time.perf_counter() - t0
    row["quant_peak_rss_mb"] = peak_rss_mb()
    res = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=windows)
    row.update(perplexity=res.perplexity, windows=res.windows, eval_tokens_per_s=res.tokens_per_s,
               peak_rss_mb=peak_rss_mb())
    return row


def _orderings(rows: dict[str, dict], fp: float) -> list[str]:
    """The paper orderings the issue asks for, read off the measured rows."""
    out = []
    for bits in (4, 3):
        for kind in ("", "-asym"):
            rtn = rows.get(f"rtn-w{bits}g64{kind}")
            for m in ("gptq", "awq"):
                r = rows.get(f"{m}-w{bits}g64{kind}")
                if rtn and r:
                    ok = "yes" if r["perplexity"] < rtn["perplexity"] else "NO"
                    out.append(f"- {m.upper()} < RTN at W{bits} g64 {'asym' if kind else 'sym'}: {ok} "
                               f"({r['perplexity']:.2f} vs {rtn['perplexity']:.2f})")
    for bits in (4, 3):
        staged, awq, gptq = (rows.get(f"{m}-w{bits}g64") for m in ("awq-gptq", "awq", "gptq"))
        if staged and awq and gptq:
            ok = "yes" if staged["perplexity"] < min(awq["perplexity"], gptq["perplexity"]) else "NO"
            out.append(f"- AWQ then GPTQ < both alone at W{bits} g64 sym: {ok} ({staged['perplexity']:.2f} vs AWQ "
                       f"{awq['perplexity']:.2f}, GPTQ {gptq['perplexity']:.2f})")
    near = {n: r for n, r in rows.items() if n != "fp32" and 4.25 <= r["bits_per_weight"] <= 4.75}
    if near and fp:
        name, best = min(near.items(), key=lambda kv: kv[1]["perplexity"])
        out.append(f"- best at ~4.5 bits/weight (4.25-4.75): {name}, {best['perplexity']:.2f} at "
                   f"{best['bits_per_weight']:.2f} bpw, {100 * (best['perplexity'] / fp - 1):+.1f}% vs fp32 "
                   f"(target <= +10%: {'yes' if best['perplexity'] <= 1.1 * fp else 'NO'})")
    return out


def write_tables(rows: dict[str, dict], mode: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"weight_only{mode}.json").write_text(json.dumps(rows, indent=2))
    fp = rows.get("fp32", {}).get("perplexity")
    lines = [
        f"# Weight-only PTQ on smollm2-135m ({'full WikiText-2 test' if mode else 'WikiText-2 test, first 10 x 2048 windows'})",
        "",
        "Calibration: 128 random 512-token windows of WikiText-2 validation, seed 0. g128 configs use g64 on this",
        "model (hidden 576). Bits per weight include scales (fp32 here), zeros, outlier values and indices.",
        "Each config runs in its own process; peak RSS covers quantization and evaluation. Quantization times",
        "were taken with other jobs sharing the 2 cores for most rows, so treat them as upper bounds; the",
        "gptq-w4g64 row was re-run on an idle machine.  The model's own weights are Q4_1 g32: SpQR's 16-weight groups partly sit on",
        "that grid, so its 4-bit number flatters it; OWQ and the g64 methods do not.",
        "",
        "| config | bits/weight | perplexity | vs fp32 | quant time s | peak RSS MiB | reference ppl |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        rel = f"{100 * (r['perplexity'] / fp - 1):+.1f}%" if fp else ""
        ref = REFERENCE.get(name, "")
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | {rel} | "
                     f"{r['quant_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {ref} |")
    lines += ["", "Reference (llm-compressor 0.14 on this machine, issue 4): RTN W4 g64 sym 27.83; GPTQ W4 g64 sym "
              "25.40 in 970 s with 2.3 GB peak RSS.",
              "", "awq-gptq-*: a staged recipe, AWQ's scale search and folding (round: false) then GPTQ's rounding on "
              "the same calibration; the *-clip rows are the same with AutoAWQ's clipping applied as a weight clamp "
              "before GPTQ (measured once, then dropped from the shipped recipes).",
              "", "hqq-lib-*: the hqq library 0.2.8's own quantizer (BaseQuantizeConfig defaults: g64 along the input "
              "dimension, zero rounded at 4 bits only) on the same decoder linears in the same run, fp16 scale and zero "
              "(4.5 / 3.5 bits per weight, as lowbit's hqq recipes). Its time is the quantizer alone; lowbit's includes "
              "the block passes quantize() makes to report each layer's output error. lowbit's HQQ starts from the "
              "rounded zero at every width (methods/hqq.py): 24.68 vs 24.79 at W4 and 67.18 vs 169.66 at W3, the "
              "library's W3 being worse than RTN asym (69.13) because its unrounded start leaves 0 off the grid.",
              "", "Orderings:", *(_orderings(rows, fp) if fp else [])]
    (RESULTS / f"weight_only{mode}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="evaluate on the full test split (148 windows)")
    parser.add_argument("--only", nargs="*", help="run only these configurations")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    windows = None if args.full else 10
    if args.one:
        print(json.dumps(run_one(args.one, windows, args.nsamples)))
        return
    mode = "_full" if args.full else ""
    path = RESULTS / f"weight_only{mode}.json"
    rows: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    peers = []
    try:
        import llmcompressor  # noqa: F401
        peers += PEERS
    except ImportError:
        pass
    try:
        import hqq  # noqa: F401
        peers += HQQ_PEERS
    except ImportError:
        pass
    todo = args.only or ["fp32", *CONFIGS, *peers]
    for name in todo:
        if name in rows and not args.only:
            continue
        cmd = [sys.executable, __file__, "--one", name, "--nsamples", str(args.nsamples)] + (["--full"] if args.full else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rows[name]
        print(f"{name:24s} ppl {r['perplexity']:8.3f}  bpw {r['bits_per_weight']:.3f}  "
              f"{r['quant_seconds']:6.0f} s  {r['peak_rss_mb']:6.0f} MiB", flush=True)
        write_tables(rows, mode)


if __name__ == "__main__":
    main()
