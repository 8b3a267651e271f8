"""GGUF Q4_K_M files of smollm2-135m (issue 21): llama.cpp's rounding as lowbit reimplements it, the same with an
importance matrix, and lowbit-optimised values (GPTQ codes written code for code where the mix's type is a
legacy 32-block one), all at the same mix and so the same size.

On smollm2 (hidden 576, not a multiple of 256) llama.cpp's Q4_K_M puts every 576-wide matrix in its fallback
Q5_0 (Q8_0 where the mix wants Q6_K), and only ffn_down (1536 wide) in Q4_K / Q6_K.  The ``gptq-q5`` row runs
GPTQ W5 g32 symmetric with fp16 scales (Q5_0's grid) on those 576-wide linears and leaves ffn_down to the
imatrix-weighted K-quant rounding.

Each row runs in its own process: build the file, read it back with transformers' GGUF reader (gguf-py's
dequantizers) and evaluate the first 10 WikiText-2 test windows of 2048 with lowbit's fp32 forward: the
perplexity of the file's weights, not of llama.cpp's kernels (which also round activations to 8 bits; on Q4_0
files the two differed by 0.1-0.3%, ``gguf_vs_llamacpp.md``).  Calibration (imatrix, GPTQ): 128 random
512-token windows of WikiText-2 validation, seed 0.

    python benchmarks/gguf_kquants.py [--only imatrix]

Writes ``results/gguf_kquants.json`` and ``gguf_kquants.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from _results import rows_main, table_lines

ROWS = ["llamacpp-rules", "imatrix", "gptq-q5"]
LLAMACPP_Q4_K_M = (21.28, 100.6)  # llama.cpp's own Q4_K_M of the fp32 model, run by llama.cpp (issue 21)
GPTQ_Q5 = {"name": "gptq-q5-for-q4km", "methods": [{
    "method": "gptq", "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
    "spec": {"type": "int", "bits": 5, "granularity": "group", "group_size": 32, "symmetric": True,
             "scale_dtype": "float16"}}]}


def run_one(name: str, args: argparse.Namespace) -> dict:
    from lowbit.data import get_calibration
    from lowbit.eval.perplexity import evaluate
    from lowbit.export.gguf import export_gguf
    from lowbit.export.imatrix import collect_imatrix
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, tok = load_model("smollm2-135m")
    calib = get_calibration("wikitext2", tok, nsamples=128, seqlen=512, seed=0)
    t0 = time.perf_counter()
    if name == "gptq-q5":
        quantize(model, GPTQ_Q5, calib, progress=False)
    imatrix = collect_imatrix(model, calib) if name != "llamacpp-rules" else None
    folder = Path(tempfile.mkdtemp())
    report = export_gguf(model, tok, folder / "m.gguf", "Q4_K_M", "Q8_0", imatrix)
    seconds = time.perf_counter() - t0
    size = (folder / "m.gguf").stat().st_size
    back, _ = load_model(folder / "m.gguf")
    ppl = evaluate(back, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows).perplexity
    shutil.rmtree(folder, ignore_errors=True)
    return {"config": name, "perplexity": ppl, "size_mb": size / 1e6, "seconds": seconds,
            "types": dict(Counter(r.type for r in report.tensors)), "code_for_code": report.exact_count,
            "tensors": len(report.tensors)}


def _lines(rows: dict) -> list[str]:
    body = [["llama.cpp's own Q4_K_M (run by llama.cpp, from the issue)", f"{LLAMACPP_Q4_K_M[0]:.2f}",
             f"{LLAMACPP_Q4_K_M[1]:.1f}", "", ""]]
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        body.append([name, f"{r['perplexity']:.2f}", f"{r['size_mb']:.1f}", f"{r['code_for_code']} of {r['tensors']}",
                     types])
    caption = ["# GGUF Q4_K_M of smollm2-135m: lowbit's files", "",
               "Perplexity of each file's weights (transformers' GGUF reader, lowbit's fp32 forward; first 10",
               "WikiText-2 test windows of 2048); size of the .gguf file. llamacpp-rules: llama.cpp's reference",
               "rounding as lowbit implements it; imatrix: the same weighted by an importance matrix (128 x 512",
               "WikiText-2 validation windows); gptq-q5: GPTQ W5 g32 codes written into the Q5_0 tensors, ffn_down",
               "by the imatrix-weighted K-quant fit."]
    return table_lines(caption, ["file", "perplexity", "MB", "tensors code for code", "tensor types"], body)


def main() -> None:
    rows_main(__file__, __doc__, "gguf_kquants", ROWS, run_one, _lines, {"--windows": (int, 10)})


if __name__ == "__main__":
    main()
