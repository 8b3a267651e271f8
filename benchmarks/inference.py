"""Inference on this machine: fp32, int8 and int4 in lowbit's runtime, Q8_0 / Q4_0 in llama.cpp.

Decode tok/s (greedy, KV cache, 64 steps after a 128-token prompt), prefill tok/s (the 128-token
prompt in one forward), peak RSS of a fresh process per row, and size on disk.  Each row runs in
its own subprocess so RSS is its own.  llama.cpp rows need the optional extra ``llamacpp``.

    python benchmarks/inference.py

Writes benchmarks/results/inference.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_results

ROWS = ["fp32", "int8 (rtn-w8, packed)", "int4 (gptq-w4g64, packed)", "llama.cpp Q8_0", "llama.cpp Q4_0"]
PROMPT_TOKENS, NEW_TOKENS = 128, 64


def _prompt(tok) -> list[int]:
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import tokenize_text

    return tokenize_text(tok, load_text("wikitext2", "test"))[:PROMPT_TOKENS].tolist()


def prepare(tmp: Path) -> dict[str, Path]:
    """Quantized checkpoints for every row (not timed)."""
    from lowbit.data import get_calibration
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized
    from lowbit.runtime import llamacpp

    paths = {}
    model, tok = load_model("smollm2-135m")
    calib = get_calibration("wikitext2", tok, nsamples=128, seqlen=512, seed=0)
    for row, recipe in (("int8 (rtn-w8, packed)", "rtn-w8"), ("int4 (gptq-w4g64, packed)", "gptq-w4g64")):
        import copy

        m = copy.deepcopy(model)
        quantize(m, recipe, calib, progress=False)
        paths[row] = save_quantized(m, tok, None, tmp / recipe, "compressed-tensors")[0]
    if llamacpp.available():
        export_gguf(model, tok, tmp / "f32.gguf", "F32", "F32")
        for t in ("Q8_0", "Q4_0"):
            paths[f"llama.cpp {t}"] = llamacpp.quantize(tmp / "f32.gguf", tmp / f"{t}.gguf", t, embed_type="Q8_0")
    return paths


def run_row(row: str, path: str) -> dict:
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.models.loading import load_model

    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() \
        else Path(path).stat().st_size
    if row.startswith("llama.cpp"):
        from transformers import AutoTokenizer

        from lowbit.runtime import llamacpp

        tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
        r = llamacpp.speed(path, _prompt(tok), NEW_TOKENS).to_dict()
    else:
        import torch

        from lowbit.runtime.speed import measure_speed

        model, tok = load_model(path)
        r = measure_speed(model, torch.tensor([_prompt(tok)]), NEW_TOKENS).to_dict()
    return r | {"row": row, "file_bytes": size, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(run_row(sys.argv[2], sys.argv[3])))
        return
    from lowbit.models.loading import resolve_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": resolve_model("smollm2-135m").path, **prepare(Path(tmp))}
        for row in ROWS:
            if row not in paths:
                continue
            proc = subprocess.run([sys.executable, __file__, "--one", row, str(paths[row])], capture_output=True,
                                  text=True)
            if proc.returncode:
                print(f"{row}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
                continue
            results[row] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(row, results[row], flush=True)
    lines = ["# Inference on smollm2-135m (this 2-core CPU)", "",
             f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy decode steps with the KV cache, best of 3; "
             "a fresh process per row.", "",
             "| runtime / weights | decode tok/s | prefill tok/s | peak RSS MiB | size on disk MiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row, r in results.items():
        lines.append(f"| {row} | {r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['file_bytes'] / 2**20:.1f} |")
    write_results("inference", results, lines)


if __name__ == "__main__":
    main()
