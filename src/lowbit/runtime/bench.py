"""``lowbit bench`` rows: one engine on one model, the same prompt and steps, measured in its own process.

Engines:

* ``lowbit-fast``: lowbit's runtime: packed layers on the native kernels, fp32 linears on the native
  GEMV for decode, a static KV cache and the decode step compiled with ``torch.compile``
  (``lowbit.runtime.decode``); the compile time is reported apart.
* ``lowbit-eager``: transformers' own forward with its dynamic cache (packed layers still choose their
  kernels): the baseline of every speed-up.
* ``llamacpp``: the GGUF file (the model itself, or ``--gguf``) in llama.cpp (``lowbit.runtime.llamacpp``).
* ``onnxruntime``: the ONNX file (the model itself, or ``--onnx``) in ONNX Runtime (``lowbit.runtime.onnxrt``).

Each row reports prefill and decode tokens per second (best of ``repeats`` after a warm-up), time to
first token (the prompt's forward), the process's peak RSS and, for lowbit, the bytes of weights it holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

ENGINES = ("lowbit-fast", "lowbit-eager", "llamacpp", "onnxruntime")
BENCH_TEXT = "The quick brown fox jumps over the lazy dog. "


@dataclass
class BenchRow:
    engine: str
    model: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_ms: float
    peak_rss_mb: float
    prompt_tokens: int
    new_tokens: int
    threads: int
    imports_rss_mb: float | None = None  # lowbit rows: RSS before loading the model (torch, transformers, lowbit)
    weight_bytes: int | None = None  # lowbit rows: parameters and packed buffers held
    compile_s: float | None = None  # lowbit-fast: tracing and compiling the decode step (first run only)
    kernels: dict[str, int] = field(default_factory=dict)  # packed layers' decode kernels
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """``n`` tokens of a fixed English text: every engine gets the same ids."""
    from lowbit.data.windows import tokenize_text

    return tokenize_text(tokenizer, BENCH_TEXT * (1 + n // 8))[:n].tolist()


def engine_file(engine: str, model: str, gguf: str | None, onnx: str | None) -> str | None:
    """The file ``engine`` runs: the model itself when it is of that engine's format, else ``--gguf`` / ``--onnx``."""
    if engine == "llamacpp":
        return model if model.endswith(".gguf") else gguf
    if engine == "onnxruntime":
        return model if model.endswith(".onnx") else onnx
    return None if model.endswith(".onnx") else model


def _lowbit_row(engine: str, model_ref: str, prompt: int, new: int, repeats: int, cache: str | None) -> BenchRow:
    from transformers import AutoModelForCausalLM  # noqa: F401  (imported before the baseline is read)

    from lowbit.eval.memory import current_rss_mb
    from lowbit.models.loading import load_model

    imports = current_rss_mb()
    model, tok = load_model(model_ref, cache=cache)
    return measure_loaded(engine, model, torch.tensor([prompt_ids(tok, prompt)]), new, repeats, model_ref, imports)[0]


def measure_loaded(engine: str, model: Any, ids: torch.Tensor, new: int, repeats: int, model_ref: str,
                   imports_rss_mb: float | None = None) -> tuple[BenchRow, Any]:
    """A ``lowbit-fast`` or ``lowbit-eager`` row of a loaded model on prompt ``ids`` (1, n), and the
    ``StaticDecoder`` that ran it (None for eager), for further checks on the same compiled step."""
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.runtime.decode import StaticDecoder
    from lowbit.runtime.speed import measure_speed, select_kernels, weight_bytes

    if engine == "lowbit-eager":
        r = measure_speed(model, ids, new, repeats)
        return BenchRow(engine, model_ref, r.prefill_tokens_per_s, r.decode_tokens_per_s,
                        1e3 * r.prompt_tokens / r.prefill_tokens_per_s, peak_rss_mb(), r.prompt_tokens, new, r.threads,
                        imports_rss_mb, r.weight_bytes, None, r.kernels), None
    dec = StaticDecoder(model, ids.shape[1] + new + 1, compile=True)
    first = dec.generate(ids, new)  # compiles the step
    runs = [dec.generate(ids, new) for _ in range(repeats)]
    prefill = min(g.prefill_s for g in runs)
    return BenchRow(engine, model_ref, ids.shape[1] / prefill, max(g.decode_tokens_per_s for g in runs), 1e3 * prefill,
                    peak_rss_mb(), ids.shape[1], new, torch.get_num_threads(), imports_rss_mb, weight_bytes(model),
                    first.compile_s, select_kernels(model), "" if dec.compiled else f"eager: {dec.why_eager}"), dec


def _llamacpp_row(path: str, prompt: int, new: int, repeats: int) -> BenchRow:
    from transformers import AutoTokenizer

    from lowbit.runtime import llamacpp

    if not llamacpp.available():
        raise LowbitError("llama.cpp is not installed: pip install 'lowbit[llamacpp]' (or llama-cpp-py-sync)")
    p = Path(path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    r = llamacpp.speed(p, prompt_ids(tok, prompt), new, repeats)
    return BenchRow("llamacpp", path, r.prefill_tokens_per_s, r.decode_tokens_per_s, 1e3 * prompt / r.prefill_tokens_per_s,
                    r.peak_rss_mb, prompt, new, r.threads, note=f"backend {llamacpp.backend()}")


def _onnx_row(path: str, prompt: int, new: int, repeats: int) -> BenchRow:
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.runtime.onnxrt import OnnxDecoder, onnx_speed

    decoder = OnnxDecoder(path)
    r = onnx_speed(decoder, prompt_ids(decoder.tokenizer(), prompt), new, repeats)
    return BenchRow("onnxruntime", path, r["prefill_tok_s"], r["decode_tok_s"], 1e3 * prompt / r["prefill_tok_s"],
                    peak_rss_mb(), prompt, new, torch.get_num_threads())


def measure_row(engine: str, path: str, prompt: int, new: int, repeats: int, cache: str | None = None) -> BenchRow:
    """One row, in this process."""
    if engine == "llamacpp":
        return _llamacpp_row(path, prompt, new, repeats)
    if engine == "onnxruntime":
        return _onnx_row(path, prompt, new, repeats)
    return _lowbit_row(engine, path, prompt, new, repeats, cache)


def row_in_child(engine: str, path: str, prompt: int, new: int, repeats: int, cache: str | None = None) -> BenchRow:
    """One row in a fresh process (its peak RSS is its own); a ``LowbitError`` with the child's last error line."""
    argv = [sys.executable, "-m", "lowbit.cli", "bench", path, "--engine-row", engine, "--prompt-tokens", str(prompt),
            "--new-tokens", str(new), "--repeats", str(repeats)] + (["--cache", cache] if cache else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise LowbitError(f"{engine}: {last[0].removeprefix('error: ')}")
    return BenchRow(**json.loads(proc.stdout.strip().splitlines()[-1]))
