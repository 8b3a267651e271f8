"""Export round trip on smollm2-135m: GPTQ W4 g64 (the model's stand-in for g128) -> compressed-tensors
-> plain transformers (+ compressed-tensors) and lowbit's loader; logits compared with the in-memory model,
size on disk compared with the bits-per-weight arithmetic.

    python benchmarks/export_roundtrip.py [--nsamples 128]

Writes benchmarks/results/export_roundtrip.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _results import write_results

import torch



def main() -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.data import get_calibration
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import eval_windows, tokenize_text
    from lowbit.export.compressed_tensors import export_compressed_tensors
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m")
    calib = get_calibration("wikitext2", tok, nsamples=args.nsamples, seqlen=512, seed=0)
    t0 = time.perf_counter()
    report = quantize(model, "gptq-w4g64", calib, progress=False)
    quant_s = time.perf_counter() - t0
    ids = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), 2048, 1)
    with torch.no_grad():
        ref = model(ids).logits
    row: dict = {"recipe": "gptq-w4g64", "nsamples": args.nsamples, "quant_seconds": quant_s,
                 "bits_per_weight": report.bits_per_weight, "quantized_params": report.quantized_params,
                 "eval_tokens": ids.numel()}
    with tempfile.TemporaryDirectory() as tmp:
        out = export_compressed_tensors(model, tok, Path(tmp) / "ct")
        size = (out / "model.safetensors").stat().st_size
        others = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("proj.weight"))
        row["expected_bytes"] = report.bits_per_weight * report.quantized_params / 8 + 4 * others
        row["file_bytes"] = size
        for name, loader in (("transformers", lambda: AutoModelForCausalLM.from_pretrained(out)),
                             ("lowbit", lambda: load_model(out)[0])):
            m = loader()
            with torch.no_grad():
                got = m(ids).logits
            row[f"{name}_max_abs_diff"] = (got - ref).abs().max().item()
            row[f"{name}_rel_diff"] = ((got - ref).norm() / ref.norm()).item()
            del m
    lines = ["# compressed-tensors round trip, smollm2-135m GPTQ W4 g64 sym",
             "",
             f"Calibration {args.nsamples} x 512 WikiText-2 validation windows (seed 0); logits compared on the first "
             f"WikiText-2 test window ({ids.numel()} tokens).",
             "",
             "| loader | max abs logit diff | relative diff |", "| --- | ---: | ---: |",
             f"| transformers + compressed-tensors | {row['transformers_max_abs_diff']:.3g} | {row['transformers_rel_diff']:.3g} |",
             f"| lowbit (packed QuantLinear) | {row['lowbit_max_abs_diff']:.3g} | {row['lowbit_rel_diff']:.3g} |",
             "",
             f"model.safetensors: {row['file_bytes']:,} bytes; bits-per-weight arithmetic "
             f"({report.bits_per_weight:.3f} bpw x {report.quantized_params:,} quantized weights + fp32 rest): "
             f"{row['expected_bytes']:,.0f} bytes (difference: safetensors header + weight_shape tensors)."]
    write_results("export_roundtrip", row, lines)


if __name__ == "__main__":
    main()
