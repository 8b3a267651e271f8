"""lowbit's GGUF exports run by llama.cpp, against llama.cpp's own quantization of the same fp32 model.

For smollm2-135m (needs the optional extra ``llamacpp``):
1. the fp32 model written as an F32 GGUF; llama.cpp quantizes it to Q4_0 itself (token embedding Q8_0,
   the same as lowbit's exports, so only the linear layers differ);
2. lowbit quantizes the linears with GPTQ / AWQ / RTN on Q4_0's grid (4-bit symmetric over all 16
   codes, group 32, fp16 scales) and exports Q4_0 code for code;
3. llama.cpp's perplexity of every file on the first 10 WikiText-2 test windows of 2048, next to lowbit's
   own evaluation of the same weights.

    python benchmarks/gguf_vs_llamacpp.py [--windows 10] [--nsamples 128] [--only gptq]

Writes benchmarks/results/gguf_vs_llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from _results import write_results

# Q4_0's grid: 4-bit signed codes (all 16, full_range), one fp16 scale per 32 weights
Q4_0_GRID = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True,
             "full_range": True, "scale_dtype": "float16"}
METHODS = {"rtn": {}, "gptq": {}, "awq": {"grid": 20, "clip": True}}


def main() -> None:
    from lowbit.data import get_calibration
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import eval_windows, tokenize_text
    from lowbit.eval.perplexity import evaluate
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize
    from lowbit.runtime import llamacpp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), 2048, args.windows)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_gguf(model, tok, tmp / "f32.gguf", "F32", "F32")
        rows["fp32 (F32 GGUF)"] = {"llamacpp_ppl": llamacpp.perplexity(tmp / "f32.gguf", windows),
                                   "lowbit_ppl": evaluate(model, tok, max_windows=args.windows).perplexity,
                                   "file_bytes": (tmp / "f32.gguf").stat().st_size}
        llamacpp.quantize(tmp / "f32.gguf", tmp / "llamacpp-q4_0.gguf", "Q4_0", embed_type="Q8_0")
        rows["llama.cpp Q4_0 (its own rounding)"] = {
            "llamacpp_ppl": llamacpp.perplexity(tmp / "llamacpp-q4_0.gguf", windows),
            "file_bytes": (tmp / "llamacpp-q4_0.gguf").stat().st_size}
        print(json.dumps(rows, indent=1), flush=True)
        calib = get_calibration("wikitext2", tok, nsamples=args.nsamples, seqlen=512, seed=0)
        for method in args.only:
            m = copy.deepcopy(model)
            recipe = {"name": f"{method}-q4_0", "methods": [{"method": method, "spec": Q4_0_GRID,
                                                             "ignore": ["lm_head"], "options": METHODS[method]}]}
            t0 = time.perf_counter()
            quantize(m, recipe, calib, progress=False)
            seconds = time.perf_counter() - t0
            path = tmp / f"{method}.gguf"
            rep = export_gguf(m, tok, path, "Q4_0", "Q8_0")
            rows[f"lowbit {method.upper()} -> Q4_0"] = {
                "llamacpp_ppl": llamacpp.perplexity(path, windows),
                "lowbit_ppl": evaluate(m, tok, max_windows=args.windows).perplexity,
                "file_bytes": path.stat().st_size, "quant_seconds": seconds,
                "tensors_kept": f"{rep.exact_count}/{len(rep.tensors)}"}
            print(method, rows[f"lowbit {method.upper()} -> Q4_0"], flush=True)
            del m
    lines = ["# GGUF Q4_0 in llama.cpp: lowbit's methods vs llama.cpp's own rounding (smollm2-135m)", "",
             f"Perplexity on the first {args.windows} WikiText-2 test windows of 2048, computed from llama.cpp's "
             "logits (llama-cpp-python) and from lowbit's own forward of the same weights. Token embedding Q8_0 "
             f"in every file; calibration {args.nsamples} x 512 WikiText-2 validation windows, seed 0.", "",
             "| file | llama.cpp ppl | lowbit ppl (same weights) | difference | size MiB | tensors kept code for code |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lb = r.get("lowbit_ppl")
        diff = f"{100 * (r['llamacpp_ppl'] / lb - 1):+.2f}%" if lb else ""
        lines.append(f"| {name} | {r['llamacpp_ppl']:.3f} | {f'{lb:.3f}' if lb else ''} | {diff} | "
                     f"{r['file_bytes'] / 2**20:.1f} | {r.get('tensors_kept', '')} |")
    write_results("gguf_vs_llamacpp", rows, lines)


if __name__ == "__main__":
    main()
