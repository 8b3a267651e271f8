"""Export round trips on smollm2-135m: quantize with a recipe -> compressed-tensors -> plain transformers
(+ compressed-tensors) and lowbit's loader; logits compared with the in-memory model, size on disk
compared with the bits-per-weight arithmetic.

Recipes (each a compressed-tensors format): gptq-w4g64 (pack-quantized; the model's stand-in for
g128), w8a8-rtn (int-quantized W8A8, dynamic per-token int8 inputs), w8a8-fp8
(float-quantized FP8 weights and dynamic FP8 inputs), w4a16-nvfp4 (nvfp4-pack-quantized, which
compressed-tensors 0.20 decompresses in bf16 only: both loaders run in bf16 there and are compared
with each other and with lowbit's fp32 model).

    python benchmarks/export_roundtrip.py [--recipes gptq-w4g64 ...] [--nsamples 128]

Writes benchmarks/results/export_roundtrip.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _results import RESULTS, write_results

RECIPES = ["gptq-w4g64", "w8a8-rtn", "w8a8-fp8", "w4a16-nvfp4"]


def _diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    got, ref = got.float(), ref.float()
    return (got - ref).abs().max().item(), ((got - ref).norm() / ref.norm()).item()


def roundtrip(recipe: str, nsamples: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lowbit.data import get_calibration
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import eval_windows, tokenize_text
    from lowbit.export.compressed_tensors import export_compressed_tensors
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, tok = load_model("smollm2-135m")
    calib = get_calibration("wikitext2", tok, nsamples=nsamples, seqlen=512, seed=0)
    t0 = time.perf_counter()
    report = quantize(model, recipe, calib, progress=False)
    quant_s = time.perf_counter() - t0
    ids = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), 2048, 1)
    with torch.no_grad():
        ref = model(ids).logits
    row: dict = {"recipe": recipe, "nsamples": nsamples, "quant_seconds": quant_s,
                 "bits_per_weight": report.bits_per_weight, "quantized_params": report.quantized_params,
                 "eval_tokens": ids.numel()}
    with tempfile.TemporaryDirectory() as tmp:
        out = export_compressed_tensors(model, tok, Path(tmp) / "ct")
        cfg = json.loads((out / "config.json").read_text())
        row["format"] = cfg["quantization_config"]["format"]
        row["load_dtype"] = cfg["dtype"]
        size = (out / "model.safetensors").stat().st_size
        others = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("proj.weight"))
        row["expected_bytes"] = report.bits_per_weight * report.quantized_params / 8 + 4 * others
        row["file_bytes"] = size
        dtype = getattr(torch, cfg["dtype"])
        outs = {}
        for name, loader in (("transformers", lambda: AutoModelForCausalLM.from_pretrained(out)),
                             ("lowbit", lambda: load_model(out, dtype=dtype)[0])):
            m = loader()
            with torch.no_grad():
                outs[name] = m(ids).logits
            row[f"{name}_max_abs_diff"], row[f"{name}_rel_diff"] = _diff(outs[name], ref)
            del m
        row["transformers_vs_lowbit_max_abs"] = _diff(outs["transformers"], outs["lowbit"])[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    path = RESULTS / "export_roundtrip.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    if "recipe" in rows:  # the single-row layout of an earlier version
        rows = {rows["recipe"]: rows}
    for recipe in args.recipes:
        rows[recipe] = roundtrip(recipe, args.nsamples)
        print(recipe, {k: v for k, v in rows[recipe].items() if "diff" in k or "abs" in k}, flush=True)
    lines = ["# compressed-tensors round trips, smollm2-135m",
             "",
             f"Calibration {args.nsamples} x 512 WikiText-2 validation windows (seed 0); logits on the first WikiText-2 "
             "test window (2048 tokens) compared with lowbit's in-memory quantized model (fp32). Each loader runs the "
             "checkpoint in its config dtype (bf16 for NVFP4: compressed-tensors 0.20 decompresses NVFP4 to bf16 only).",
             "",
             "| recipe | format | load dtype | transformers max abs / rel | lowbit loader max abs / rel | "
             "transformers vs lowbit | file bytes | bpw arithmetic bytes |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows.values():
        lines.append(f"| {r['recipe']} | {r.get('format', 'pack-quantized')} | {r.get('load_dtype', 'float32')} | "
                     f"{r['transformers_max_abs_diff']:.3g} / {r['transformers_rel_diff']:.3g} | "
                     f"{r['lowbit_max_abs_diff']:.3g} / {r['lowbit_rel_diff']:.3g} | "
                     f"{r.get('transformers_vs_lowbit_max_abs', float('nan')):.3g} | {r['file_bytes']:,} | "
                     f"{r['expected_bytes']:,.0f} |")
    lines += ["", "Bits-per-weight arithmetic: the report's bpw x quantized weights + the fp32 rest; the difference is "
              "the safetensors header and per-layer shape tensors (plus, for W8A8/FP8, nothing else: int8/fp8 codes are "
              "stored unpacked, 8 bits each). The lowbit loader picks its packed-int kernel by timing: for W8A8 "
              "that is the int8 x int8 kernel, whose int32 sums flip input codes sitting on rounding boundaries (same "
              "quality: 2-window perplexity 19.589 vs 19.608 with the dequantize reference). NVFP4 in bf16: "
              "compressed-tensors multiplies in bf16, lowbit in fp32 before casting, so the two bf16 models differ by rounding."]
    write_results("export_roundtrip", rows, lines)


if __name__ == "__main__":
    main()
