"""Inference on this machine: fp32, int8 and int4 in lowbit's fast runtime (native kernels, static KV cache,
compiled decode step) and in transformers' eager forward, in ONNX Runtime (lowbit's ONNX export of the
same weights), and Q8_0 / Q4_0 / Q4_K_M in llama.cpp.

Decode tok/s (greedy, KV cache, 64 steps after a 128-token prompt), prefill tok/s and time to first
token (the 128-token prompt in one forward), a 2048-token window in one forward (the regime of
``lowbit eval``), peak RSS of a fresh process per row and the RSS its imports alone take, size on
disk, and which kernel the packed layers chose.  Each row runs in its own subprocess (``lowbit.runtime.
bench.measure_row``, what ``lowbit bench`` runs) so RSS is its own.  Each fast row also decodes the
same 64 steps with the step left eager and reports whether the tokens are identical and the largest
logit difference.  llama.cpp rows need
llama-cpp-python (extra ``llamacpp``) or a loadable llama-cpp-py-sync; where neither is there, the
llama.cpp rows of the previous results are kept and marked as such.  ONNX Runtime rows need the
extra ``onnx``.  The load average before and after the run goes in the caption.

    python benchmarks/inference.py

Writes benchmarks/results/inference.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_results

LOWBIT_ROWS = {"fp32": "fp32", "int8 (rtn-w8, packed)": "rtn-w8", "int4 (gptq-w4g64, packed)": "gptq-w4g64"}
ROWS = [f"{name}, {engine}" for name in LOWBIT_ROWS for engine in ("lowbit-eager", "lowbit-fast")] + [
        "onnxruntime fp32", "onnxruntime int8 (rtn-w8, QDQ)",
        "onnxruntime int4 (gptq-w4g64, MatMulNBits)", "onnxruntime int4 (gptq-w4g64, MatMulNBits, accuracy 4)",
        "llama.cpp Q8_0", "llama.cpp Q4_0", "llama.cpp Q4_K_M"]
ONNX_ROWS = {"onnxruntime int8 (rtn-w8, QDQ)": ("rtn-w8", 0), "onnxruntime int4 (gptq-w4g64, MatMulNBits)": ("gptq-w4g64", 0),
             "onnxruntime int4 (gptq-w4g64, MatMulNBits, accuracy 4)": ("gptq-w4g64", 4)}
PROMPT_TOKENS, NEW_TOKENS, WINDOW_TOKENS = 128, 64, 2048


def _prompt(tok, n: int = PROMPT_TOKENS) -> list[int]:
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import tokenize_text

    return tokenize_text(tok, load_text("wikitext2", "test"))[:n].tolist()


def _window_tokens_per_s(model, ids, repeats: int = 2) -> float:
    """Tokens/s of one forward over a whole eval window (no cache), best of ``repeats``."""
    import time

    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - t0)
    return ids.shape[1] / best


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
    onnx = _onnx_available()
    if onnx:
        from lowbit.export.onnx_export import export_onnx

        paths["onnxruntime fp32"] = export_onnx(model, tok, tmp / "fp32.onnx").path
    for row, recipe in (("int8 (rtn-w8, packed)", "rtn-w8"), ("int4 (gptq-w4g64, packed)", "gptq-w4g64")):
        import copy

        m = copy.deepcopy(model)
        quantize(m, recipe, calib, progress=False)
        saved = save_quantized(m, tok, None, tmp / recipe, "compressed-tensors")[0]
        for engine in ("lowbit-eager", "lowbit-fast"):
            paths[f"{row}, {engine}"] = saved
        for onnx_row, (onnx_recipe, level) in ONNX_ROWS.items():
            if onnx and onnx_recipe == recipe:
                paths[onnx_row] = export_onnx(m, tok, tmp / f"{recipe}-{level}.onnx", accuracy_level=level).path
    if llamacpp.available():
        export_gguf(model, tok, tmp / "f32.gguf", "F32", "F32")
        for t in ("Q8_0", "Q4_0", "Q4_K_M"):
            paths[f"llama.cpp {t}"] = llamacpp.quantize(tmp / "f32.gguf", tmp / f"{t}.gguf", t, embed_type="Q8_0")
    return paths


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_onnx_row(path: str) -> dict:
    """Speed of an ONNX export in ONNX Runtime (same prompt, steps and window as the lowbit rows)."""
    import time

    from lowbit.eval.memory import peak_rss_mb
    from lowbit.runtime.onnxrt import OnnxDecoder, onnx_speed

    decoder = OnnxDecoder(path)
    tok = decoder.tokenizer()
    r = onnx_speed(decoder, _prompt(tok), NEW_TOKENS)
    out = {"decode_tokens_per_s": r["decode_tok_s"], "prefill_tokens_per_s": r["prefill_tok_s"],
           "peak_rss_mb": peak_rss_mb()}
    window = [_prompt(tok, WINDOW_TOKENS)]
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        decoder.forward(window)
        best = min(best, time.perf_counter() - t0)
    return out | {"window_tokens_per_s": WINDOW_TOKENS / best}


def _compiled_vs_eager(model, ids, dec) -> dict:
    """Greedy tokens and per-step logits of the compiled step (``dec``) and the same step left eager, same weights
    and kernels."""
    from lowbit.runtime.decode import StaticDecoder

    fast = dec.generate(ids, NEW_TOKENS, keep_logits=True)
    eager = StaticDecoder(model, ids.shape[1] + NEW_TOKENS + 1, compile=False).generate(ids, NEW_TOKENS, True)
    diverge = next((i for i, (a, b) in enumerate(zip(eager.tokens, fast.tokens)) if a != b), None)
    upto = NEW_TOKENS if diverge is None else diverge + 1
    worst = max((a - b).abs().max().item() for a, b in zip(eager.step_logits[:upto], fast.step_logits[:upto]))
    return {"tokens_identical": eager.tokens == fast.tokens, "first_divergence": diverge, "max_logit_diff": worst,
            "logit_scale": max(a.abs().max().item() for a in eager.step_logits)}


def run_row(row: str, path: str) -> dict:
    from lowbit.eval.memory import current_rss_mb, peak_rss_mb

    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() \
        else Path(path).stat().st_size
    if row.startswith("onnxruntime"):
        r = run_onnx_row(path)
    elif row.startswith("llama.cpp"):
        from transformers import AutoTokenizer

        from lowbit.runtime import llamacpp

        tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
        r = llamacpp.speed(path, _prompt(tok), NEW_TOKENS).to_dict() | {"backend": llamacpp.backend()}
    else:
        from collections import Counter

        import torch
        from transformers import LlamaForCausalLM  # noqa: F401  (imports counted in the baseline)

        import lowbit.runtime.decode  # noqa: F401
        from lowbit.packed import QuantLinear

        baseline = current_rss_mb()
        engine = row.rsplit(", ", 1)[1]
        b = _measure_lowbit(engine, path)
        r = b.pop("row")
        model, ids = b["model"], b["ids"]
        r["imports_rss_mb"] = baseline
        r["peak_rss_mb"] = peak_rss_mb()  # before the long window's activations
        r["window_tokens_per_s"] = _window_tokens_per_s(model, torch.tensor([_prompt(b["tok"], WINDOW_TOKENS)]))
        r["prefill_kernels"] = dict(Counter(m.kernel["prefill"] for m in model.modules()
                                            if isinstance(m, QuantLinear)))
    return {"peak_rss_mb": peak_rss_mb()} | r | {"row": row, "file_bytes": size}


def _measure_lowbit(engine: str, path: str) -> dict:
    """``lowbit bench``'s measurement of one lowbit row (``measure_loaded``) on the wikitext prompt; the model kept
    for more."""
    import torch

    from lowbit.models.loading import load_model
    from lowbit.runtime.bench import measure_loaded

    model, tok = load_model(path)
    ids = torch.tensor([_prompt(tok)])
    bench_row, dec = measure_loaded(engine, model, ids, NEW_TOKENS, 3, path)
    row = bench_row.to_dict()
    if dec is not None:
        row |= _compiled_vs_eager(model, ids, dec)
    return {"row": row, "model": model, "ids": ids, "tok": tok}


def _kernels(r: dict) -> str:
    """``decode: int4pack 180, dequant 30 / prefill: dequant 210`` ("-" for unpacked rows)."""
    if not r.get("kernels"):
        return "-"

    def fmt(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"decode: {fmt(r['kernels'])} / prefill: {fmt(r.get('prefill_kernels') or {})}"


NATIVE = " (llama-cpp-python native build)"


def keep_previous_llamacpp(results: dict, previous: Path) -> list[str]:
    """Add to ``results`` the llama.cpp rows of ``previous`` (a results JSON) that this run did not
    measure, marked ``previous_run``; rows of llama-cpp-python's native build are kept beside this run's
    rows of another backend (the prebuilt AVX2 library), under their own name.  Returns their names."""
    kept: list[str] = []
    if not previous.is_file():
        return kept
    old = json.loads(previous.read_text())
    for row, r in old.items():
        if not row.startswith("llama.cpp"):
            continue
        native = r.get("backend", "llamacpp") == "llamacpp"
        name = row if row.endswith(NATIVE) or not native else row + NATIVE
        measured_native = results.get(row, {}).get("backend") == "llamacpp"
        if name not in results and not (native and measured_native):
            results[name] = r | {"previous_run": True}
            kept.append(name)
    return kept


def _mib(v) -> str:
    return f"{v:.0f}" if v else "-"


def must_show(results: dict) -> list[str]:
    """The issue's claims, computed from the rows."""
    def get(row: str, key: str):
        return results.get(row, {}).get(key)
    fp_e, fp_f = "fp32, lowbit-eager", "fp32, lowbit-fast"
    out = ["", "## Must show", ""]
    base = get(fp_e, "decode_tokens_per_s")
    for name in ("int4 (gptq-w4g64, packed)", "int8 (rtn-w8, packed)"):
        for engine in ("lowbit-fast", "lowbit-eager"):
            d = get(f"{name}, {engine}", "decode_tokens_per_s")
            if d and base:
                out.append(f"- {name} {engine} decode {d:.1f} tok/s = {d / base:.2f}x fp32 eager ({base:.1f}); "
                           f"fp32 on the fast runtime: {get(fp_f, 'decode_tokens_per_s') or 0:.1f} "
                           f"({d / (get(fp_f, 'decode_tokens_per_s') or d):.2f}x)")
    for name in ("int4 (gptq-w4g64, packed)", "int8 (rtn-w8, packed)"):
        p, q = get(f"{name}, lowbit-eager", "prefill_tokens_per_s"), get(fp_e, "prefill_tokens_per_s")
        w, v = get(f"{name}, lowbit-eager", "window_tokens_per_s"), get(fp_e, "window_tokens_per_s")
        if p and q:
            out.append(f"- {name} prefill {p:.0f} tok/s vs fp32 {q:.0f} ({p / q:.2f}x); 2048-token window "
                       f"{w or 0:.0f} vs {v or 0:.0f} ({(w or 0) / (v or 1):.2f}x)")
    for engine in ("lowbit-eager", "lowbit-fast"):
        r4, r32 = results.get(f"int4 (gptq-w4g64, packed), {engine}"), results.get(f"fp32, {engine}")
        if r4 and r32 and r4.get("imports_rss_mb"):
            over4, over32 = r4["peak_rss_mb"] - r4["imports_rss_mb"], r32["peak_rss_mb"] - r32["imports_rss_mb"]
            out.append(f"- peak RSS, int4 vs fp32 ({engine}): whole process {r4['peak_rss_mb']:.0f} vs "
                       f"{r32['peak_rss_mb']:.0f} MiB ({r4['peak_rss_mb'] / r32['peak_rss_mb']:.0%}); above the "
                       f"{r4['imports_rss_mb']:.0f} MiB its imports take: {over4:.0f} vs {over32:.0f} MiB "
                       f"({over4 / over32:.0%})")
    for row, r in results.items():
        if "tokens_identical" in r:
            div = "" if r["tokens_identical"] else f", first divergence at step {r['first_divergence']}"
            out.append(f"- {row}: compiled vs eager step, {NEW_TOKENS} greedy tokens identical: "
                       f"{'yes' if r['tokens_identical'] else 'NO'}{div}; largest logit difference "
                       f"{r['max_logit_diff']:.2e} (logits up to {r['logit_scale']:.1f})")
    return out


def report_lines(results: dict, kept: list[str], load_before: float, load_after: float) -> list[str]:
    """The markdown report: caption (with the load average), table, notes."""
    lines = ["# Inference on smollm2-135m (this 2-core CPU)", "",
             f"{PROMPT_TOKENS}-token wikitext2 prompt, {NEW_TOKENS} greedy decode steps with the KV cache, best of 3; "
             f"one forward over a {WINDOW_TOKENS}-token wikitext2 window (what `lowbit eval` runs per window), "
             "best of 2; a fresh process per row. Load average (1 min; the run itself accounts for about 2) "
             f"{load_before:.2f} before the run, {load_after:.2f} after.", "",
             "lowbit-eager: transformers' forward with its dynamic cache (packed layers on their chosen kernels, "
             "fp32 linears on MKL). lowbit-fast: `lowbit.runtime.decode.StaticDecoder`: static KV cache, the decode "
             "step compiled by torch.compile (inductor), packed and fp32 linears on lowbit's native GEMV for "
             "decode (compile time of the first run apart).", "",
             f"| runtime / weights | decode tok/s | prefill tok/s | time to first token ms | {WINDOW_TOKENS}-token "
             "window tok/s | peak RSS MiB | of which imports MiB | size on disk MiB | weights held MiB | compile s | "
             "packed kernels (layers) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row, r in results.items():
        window = f"{r['window_tokens_per_s']:.0f}" if r.get("window_tokens_per_s") else "-"
        held = f"{r['weight_bytes'] / 2**20:.0f}" if r.get("weight_bytes") else "-"
        ttft = r.get("time_to_first_token_ms") or 1e3 * PROMPT_TOKENS / r["prefill_tokens_per_s"]
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") else "-"
        name = f"{row} (previous run)" if r.get("previous_run") else row
        lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | {ttft:.0f} | "
                     f"{window} | {r['peak_rss_mb']:.0f} | {_mib(r.get('imports_rss_mb'))} | "
                     f"{r['file_bytes'] / 2**20:.1f} | {held} | {comp} | {_kernels(r)} |")
    lines += must_show(results)
    lines += ["", "Kernels (benchmarks/results/kernels.md): where lowbit's native library is built (a C file and its "
              "torch operators, compiled once per machine), 4- and 8-bit decode layers take its GEMV by rule, untimed; "
              "prefill dequantizes in one vectorised pass and multiplies with MKL. Elsewhere layers probe torch's "
              "kernels as before. Packed checkpoints load onto the meta device: no fp32 module tree is built, the "
              "packed words are used as stored."]
    lines += ["", "ONNX Runtime rows: `lowbit export --format onnx` of the same weights, run by onnxruntime's CPU "
              "provider through `lowbit.runtime.onnxrt` (the KV cache as graph inputs / outputs, numpy in between). "
              "Accuracy level 0 computes MatMulNBits in fp32 (what `lowbit eval` measures); 4 quantizes its inputs "
              "to int8 per block."]
    if any(r.get("backend") == "llamacpp_capi" for r in results.values()):
        lines += ["", "llama.cpp rows without a suffix: the prebuilt `libllama` of llama-cpp-py-sync 0.11739 "
                  "(llama.cpp commit 0ce8cd1), compiled for AVX2 only (no AVX-512 / VNNI kernels), through its C API "
                  "(`lowbit.runtime.llamacpp_capi`); llama-cpp-python is not installed in this environment (it "
                  "compiles for ~45 min here). That library asks for glibc 2.38 for four C23 `strto*` / `sscanf` "
                  "entry points; this machine has 2.36, so for this run those were shimmed to their C99 "
                  "equivalents (benchmarks/tools/llamacpp_glibc_shim.py)."]
    if kept:
        lines += ["", f"{', '.join(kept)}: kept from the previous run; the native llama-cpp-python build "
                  "used its plain CPU buffers (the repacked/AMX ones crashed with that build)."]
    return lines


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(run_row(sys.argv[2], sys.argv[3])))
        return
    from _results import RESULTS

    from lowbit.models.loading import resolve_model

    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = resolve_model("smollm2-135m").path
        paths = {"fp32, lowbit-eager": fp32, "fp32, lowbit-fast": fp32, **prepare(Path(tmp))}
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
    load_after = os.getloadavg()
    kept = keep_previous_llamacpp(results, RESULTS / "inference.json")
    lines = report_lines(results, kept, load_before[0], load_after[0])
    write_results("inference", results, lines)


if __name__ == "__main__":
    main()
