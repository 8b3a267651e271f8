"""ONNX export (issue 21): lowbit checkpoints run by ONNX Runtime, perplexity against lowbit's own evaluation.

Each row: quantize smollm2-135m with the row's recipe (calibration: 128 random 512-token windows of WikiText-2
validation, seed 0; checkpoints are kept under ``--work`` and reused), save and reload it through lowbit,
evaluate the first 10 WikiText-2 test windows of 2048 in lowbit, export it with ``lowbit export --format onnx``
(the row's weight ops and MatMulNBits accuracy level) and evaluate the same windows in ONNX Runtime (CPU).
The file size is set beside the size the bits-per-weight arithmetic predicts (computed here from the layer
shapes and formats, not from the exporter's own bookkeeping).

    python benchmarks/onnx_export.py [--only ROW ...] [--work DIR]

Writes ``results/onnx_export.json`` and ``onnx_export.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from _results import rows_main, table_lines

ROWS = {  # row -> (recipe or None for fp32, checkpoint format, ONNX weight ops, accuracy level)
    "fp32": (None, None, "matmulnbits", 0),
    "gptq-w4g64 (MatMulNBits)": ("gptq-w4g64", "compressed-tensors", "matmulnbits", 0),
    "gptq-w4g64 (QDQ)": ("gptq-w4g64", "compressed-tensors", "qdq", 0),
    "gptq-w4g64 (MatMulNBits, accuracy 4)": ("gptq-w4g64", "compressed-tensors", "matmulnbits", 4),
    "w8a8-smoothquant (QDQ)": ("w8a8-smoothquant", "fake-quant", "qdq", 0),
}


def _checkpoint(recipe: str, fmt: str, work: Path) -> Path:
    from lowbit.data import get_calibration
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    out = work / recipe
    if not (out / "config.json").is_file():
        model, tok = load_model("smollm2-135m")
        report = quantize(model, recipe, get_calibration("wikitext2", tok, nsamples=128, seqlen=512, seed=0),
                          progress=False)
        save_quantized(model, tok, report, out, fmt)
    return out


def predicted_bytes(model, ops: str) -> tuple[int, int, int]:
    """(tensor bytes, quantized-linear bytes, quantized-linear weights) from each layer's shape and format:
    MatMulNBits packs 2/4-bit slots (3-bit codes in 4) in blocks with an fp32 scale (and a packed zero point);
    QDQ holds int4 / int8 codes with fp32 scales (and zero points at the code width); the rest is fp32."""
    from lowbit.packed.qlinear import int_weights

    weights = int_weights(model, strict=False)
    total = qbytes = qparams = 0
    for name, w in weights.items():
        n, k = w.shape
        groups = 1 if w.group_size is None else math.ceil(k / w.group_size)
        pow2 = w.group_size is not None and w.group_size >= 16 and not w.group_size & (w.group_size - 1)
        if ops == "matmulnbits" and w.bits <= 4 and pow2:
            slot = 2 if w.bits <= 2 else 4
            size = n * groups * w.group_size * slot // 8 + n * groups * 4
            size += 0 if w.zero is None else n * math.ceil(groups * slot / 8)
        else:
            width = 4 if w.bits <= 4 else 8
            size = math.ceil(n * k * width / 8) + n * groups * 4
            size += 0 if w.zero is None else math.ceil(n * groups * width / 8)
        total += size
        qbytes += size
        qparams += n * k
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        layer, _, kind = name.rpartition(".")
        if p.data_ptr() in seen or (kind == "weight" and layer in weights):
            continue  # the tied head reads the embedding table; quantized weights are counted above
        seen.add(p.data_ptr())
        total += p.numel() * 4
    total += model.model.rotary_emb.inv_freq.numel() * 4
    return total, qbytes, qparams


def run_one(row: str, args: argparse.Namespace) -> dict:
    import onnx

    from lowbit.eval.perplexity import evaluate
    from lowbit.export.codes import attach_codes
    from lowbit.export.onnx_export import export_onnx
    from lowbit.models.loading import load_model, resolve_model
    from lowbit.runtime.onnxrt import evaluate_onnx

    recipe, fmt, ops, level = ROWS[row]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model("smollm2-135m").path if recipe is None else _checkpoint(recipe, fmt, work)
    model, tok = load_model(src)
    attach_codes(model, Path(src))
    lowbit_ppl = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows).perplexity
    path = work / (row.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".onnx")
    t0 = time.perf_counter()
    report = export_onnx(model, tok, path, ops, level)
    export_s = time.perf_counter() - t0
    tensors, qbytes, qparams = predicted_bytes(model, ops)
    meta = sum(len(p.key) + len(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props)
    del model
    result = evaluate_onnx(path, "wikitext2", "test", 2048, args.windows)
    size = report.size()
    return {"row": row, "lowbit_perplexity": lowbit_ppl, "onnx_perplexity": result.perplexity,
            "relative_difference": result.perplexity / lowbit_ppl - 1, "file_bytes": size,
            "predicted_tensor_bytes": tensors, "metadata_bytes": meta, "linear_bits_per_weight":
            8 * qbytes / qparams if qparams else 32.0, "forms": sorted({r.form for r in report.records}),
            "inputs": sorted({r.activations for r in report.records} - {"-"}), "export_seconds": export_s,
            "onnxruntime_tokens_per_s": result.tokens_per_s, "perplexity": result.perplexity}


def _lines(rows: dict) -> list[str]:
    body = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        predicted = r["predicted_tensor_bytes"] + r["metadata_bytes"]
        body.append([name, f"{r['lowbit_perplexity']:.4f}", f"{r['onnx_perplexity']:.4f}",
                     f"{100 * r['relative_difference']:+.3f}%", f"{r['linear_bits_per_weight']:.3f}",
                     f"{r['file_bytes'] / 1e6:.2f}", f"{predicted / 1e6:.2f}",
                     f"{100 * (r['file_bytes'] / predicted - 1):+.3f}%", "; ".join(r["forms"] + r["inputs"])])
    caption = ["# ONNX export of smollm2-135m, run by ONNX Runtime (CPU)", "",
               "Perplexity: first 10 WikiText-2 test windows of 2048, in lowbit (the reloaded checkpoint) and in ONNX",
               "Runtime (the exported file). Predicted size: the layer shapes times each format's bits (fp32 scales;",
               "3-bit codes would take 4-bit slots) plus the file's metadata (config and tokenizer, base64), against",
               "the file on disk (protobuf framing is the rest). Accuracy 4: MatMulNBits quantizes its inputs to int8",
               "per block (ONNX Runtime's fast path); 0 computes in fp32 as lowbit does."]
    return table_lines(caption, ["row", "lowbit ppl", "onnxruntime ppl", "difference", "linear bits/weight",
                                 "file MB", "predicted MB", "file vs predicted", "weights; inputs"], body)


if __name__ == "__main__":
    rows_main(__file__, __doc__, "onnx_export", list(ROWS), run_one, _lines,
              {"--windows": (int, 10), "--work": (str, "/tmp/lowbit-onnx-bench")})
