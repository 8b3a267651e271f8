"""GGUF K-quant mixes of smollm2-135m run by llama.cpp (issue 21): llama.cpp's own Q4_K_M / Q3_K_M against lowbit's
files of the same mix (so the same tensor types and size): llama.cpp's rounding as lowbit implements it, the same
weighted by an importance matrix, and lowbit-optimised values (GPTQ codes written code for code wherever the mix's
type is a 32-block legacy grid, imatrix-weighted rounding for the rest).

On smollm2 (hidden 576, not a multiple of 256) llama.cpp's mixes put every 576-wide matrix in a fallback type (Q5_0
for Q4_K, Q8_0 for Q6_K, Q4_0 for Q3_K) and the tied embedding / head in Q8_0; only ffn_down (1536 wide) holds
K-quants.  The ``gptq`` rows run GPTQ (symmetric, g32, fp16 scales) at 4 / 5 / 8 bits on the Q4_0 / Q5_0 / Q8_0
tensors, in one sequential pass.

Each row runs in its own process: build the file (llama.cpp's rows: ``llama_model_quantize`` of lowbit's F32 GGUF
of the model), evaluate the first 10 WikiText-2 test windows of 2048 in llama.cpp (``lowbit.runtime.llamacpp``) and,
as a cross-check of the weights, in lowbit (transformers' GGUF reader, fp32 forward).  Calibration (imatrix, GPTQ):
128 random 512-token windows of WikiText-2 validation, seed 0.

    python benchmarks/gguf_kquants.py [--only "lowbit Q4_K_M gptq"]

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

MIXES = ("Q4_K_M", "Q3_K_M")
ROWS = [f"{who} {mix}{how}" for mix in MIXES
        for who, how in (("llama.cpp", ""), ("lowbit", ""), ("lowbit", " imatrix"), ("lowbit", " gptq"))]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
LEGACY_GRIDS = {"Q5_0": 5, "Q8_0": 8, "Q4_0": 4}  # symmetric 32-blocks with an fp16 scale: GPTQ's grid exactly


def gptq_recipe(model, mix: str) -> dict:
    """GPTQ entries for every block linear whose mix type is a legacy symmetric grid, one entry per bit width."""
    import re

    from lowbit.export.gguf_mix import mix_type

    cfg = model.config
    n_gqa = cfg.num_attention_heads // (cfg.num_key_value_heads or cfg.num_attention_heads)
    by_bits: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "model" and parts[1] == "layers" and parts[4] in GGUF_NAMES:
            gname = f"blk.{parts[2]}.{GGUF_NAMES[parts[4]]}.weight"
            kind = mix_type(gname, mix, cfg.num_hidden_layers, module.in_features, has_output=False, n_gqa=n_gqa)
            if kind in LEGACY_GRIDS:
                by_bits.setdefault(LEGACY_GRIDS[kind], []).append(re.escape(name))
    return {"name": f"gptq-for-{mix.lower()}", "methods": [
        {"method": "gptq", "targets": [f"re:({'|'.join(names)})"],
         "spec": {"type": "int", "bits": bits, "granularity": "group", "group_size": 32, "symmetric": True,
                  "scale_dtype": "float16"}} for bits, names in sorted(by_bits.items())]}


def run_one(name: str, args: argparse.Namespace) -> dict:
    from lowbit.data import eval_windows, get_calibration, load_text, tokenize_text
    from lowbit.eval.perplexity import evaluate
    from lowbit.export.gguf import export_gguf
    from lowbit.export.imatrix import collect_imatrix
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize
    from lowbit.runtime import llamacpp

    who, mix, *how = name.split()
    model, tok = load_model("smollm2-135m")
    folder = Path(tempfile.mkdtemp())
    path = folder / "m.gguf"
    report = None
    t0 = time.perf_counter()
    if who == "llama.cpp":
        export_gguf(model, tok, folder / "f32.gguf", "F32", "F32")
        llamacpp.quantize(folder / "f32.gguf", path, mix, embed_type=None)
    else:
        calib = get_calibration("wikitext2", tok, nsamples=128, seqlen=512, seed=0)
        imatrix = collect_imatrix(model, calib) if how else None
        if how == ["gptq"]:
            quantize(model, gptq_recipe(model, mix), calib, progress=False)
        report = export_gguf(model, tok, path, mix, "Q8_0", imatrix)
    seconds = time.perf_counter() - t0
    windows = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), 2048, args.windows)
    ppl_llamacpp = llamacpp.perplexity(path, windows)
    back, _ = load_model(path)
    ppl_lowbit = evaluate(back, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows).perplexity
    row = {"config": name, "perplexity": ppl_llamacpp, "lowbit_perplexity": ppl_lowbit,
           "size_mb": path.stat().st_size / 1e6, "seconds": seconds, "llamacpp_backend": llamacpp.backend()}
    if report is not None:
        row |= {"types": dict(Counter(r.type for r in report.tensors)), "code_for_code": report.exact_count,
                "tensors": len(report.tensors)}
    else:
        from gguf import GGUFReader

        row["types"] = dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))
    shutil.rmtree(folder, ignore_errors=True)
    return row


def _lines(rows: dict) -> list[str]:
    body = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        ref = rows.get(f"llama.cpp {name.split()[1]}")
        vs = f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.2f}%" if ref and ref is not r else ""
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        kept = f"{r['code_for_code']} of {r['tensors']}" if "code_for_code" in r else "-"
        body.append([name, f"{r['perplexity']:.2f}", vs, f"{r['lowbit_perplexity']:.2f}", f"{r['size_mb']:.1f}",
                     kept, types])
    caption = ["# GGUF K-quant mixes of smollm2-135m, run by llama.cpp", "",
               "Perplexity in llama.cpp (its CPU kernels; first 10 WikiText-2 test windows of 2048) and of the same",
               "file's weights in lowbit (transformers' GGUF reader, fp32 forward); size of the .gguf file. llama.cpp",
               "rows: llama.cpp's own quantizer on the fp32 model (no imatrix). lowbit: llama.cpp's reference rounding",
               "as lowbit implements it (the same tensor types); imatrix: weighted by an importance matrix (128 x 512",
               "WikiText-2 validation windows); gptq: GPTQ codes written code for code into every Q4_0 / Q5_0 / Q8_0 one,",
               "the imatrix-weighted rounding for the K-quant ones. llama.cpp: the prebuilt AVX2 library of",
               "llama-cpp-py-sync (see inference.md)."]
    return table_lines(caption, ["file", "llama.cpp ppl", "vs llama.cpp's own", "lowbit ppl", "MB",
                                 "tensors code for code", "tensor types"], body)


def main() -> None:
    rows_main(__file__, __doc__, "gguf_kquants", ROWS, run_one, _lines, {"--windows": (int, 10)})


if __name__ == "__main__":
    main()
