"""Quantized embeddings and head (issue 21): what rounding the input embedding (tied to the head on smollm2-135m)
costs in perplexity and saves in checkpoint size, on top of GPTQ W4 g64.

Each row runs in its own process: quantize smollm2-135m with the row's recipe (calibration: 128 random 512-token
windows of WikiText-2 validation, seed 0), save it as compressed-tensors, reload it through lowbit and evaluate
the first 10 WikiText-2 test windows of 2048.  Size: the saved ``model.safetensors``.

    python benchmarks/embeddings.py [--only gptq-w4g64-embed8]

Writes ``results/embeddings.json`` and ``embeddings.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _results import rows_main, table_lines

ROWS = ["gptq-w4g64", "gptq-w4g64-embed8", "gptq-w4g64-embed4"]


def run_one(name: str, args: argparse.Namespace) -> dict:
    from lowbit.data import get_calibration
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    model, tok = load_model("smollm2-135m")
    report = quantize(model, name, get_calibration("wikitext2", tok, nsamples=128, seqlen=512, seed=0),
                      progress=False)
    folder = Path(tempfile.mkdtemp())
    out, fmt = save_quantized(model, tok, report, folder / name, "compressed-tensors")
    size = (out / "model.safetensors").stat().st_size
    back, _ = load_model(out)
    ppl = evaluate(back, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows).perplexity
    shutil.rmtree(folder, ignore_errors=True)
    embed = next((l for l in report.layers if l["name"] == "model.embed_tokens"), None)
    return {"config": name, "perplexity": ppl, "size_mb": size / 1e6, "model_bits_per_weight": report.model_bits_per_weight,
            "embed_bits": embed["bits_per_weight"] if embed else 32.0,
            "embed_weight_error": embed["weight_error"] if embed else 0.0, "format": fmt}


def _lines(rows: dict) -> list[str]:
    base = rows.get("gptq-w4g64")
    body = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        dppl = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%" if base else ""
        dsize = f"{100 * (r['size_mb'] / base['size_mb'] - 1):+.1f}%" if base else ""
        body.append([name, f"{r['embed_bits']:.2f}", f"{r['embed_weight_error']:.2e}", f"{r['perplexity']:.4f}", dppl,
                     f"{r['size_mb']:.1f}", dsize, f"{r['model_bits_per_weight']:.2f}"])
    caption = ["# Quantized embedding (tied head) on smollm2-135m, on top of GPTQ W4 g64", "",
               "compressed-tensors checkpoints saved and reloaded through lowbit; perplexity: first 10 WikiText-2",
               "test windows of 2048. The embedding is tied to the head here, so one tensor (28.3M of the model's",
               "134.5M parameters) serves both; embed8: RTN int8 per row; embed4: RTN int4 g64 with a zero point."]
    return table_lines(caption, ["config", "embedding bits", "embedding weight error", "perplexity", "vs gptq-w4g64",
                                 "model.safetensors MB", "size vs gptq-w4g64", "model bits/weight"], body)


def main() -> None:
    rows_main(__file__, __doc__, "embeddings", ROWS, run_one, _lines, {"--windows": (int, 10)})


if __name__ == "__main__":
    main()
