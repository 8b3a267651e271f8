"""llama.cpp through llama-cpp-python (optional extra ``llamacpp``) or, where that is not installed, the
prebuilt C library of ``llama-cpp-py-sync`` (``llamacpp_capi``): perplexity, quantization, speed.

The same token windows lowbit evaluates are fed to llama.cpp, so perplexities compare one to
one; llama.cpp's own quantizer (``llama_model_quantize``) provides the baseline GGUFs.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError("llama.cpp runs need llama-cpp-python: pip install 'lowbit[llamacpp]'") from None
    return llama_cpp


def _has_llama_cpp_python() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def backend() -> str | None:
    """The module running llama.cpp jobs: this one (llama-cpp-python), ``llamacpp_capi``, or None."""
    if _has_llama_cpp_python():
        return "llamacpp"
    from lowbit.runtime import llamacpp_capi

    return "llamacpp_capi" if llamacpp_capi.available() else None


def available() -> bool:
    return backend() is not None


def _require_backend() -> str:
    name = backend()
    if name is None:
        raise LowbitError("llama.cpp runs need llama-cpp-python (pip install 'lowbit[llamacpp]') or a loadable "
                          "llama-cpp-py-sync")
    return name


def open_model(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` on ``path`` with llama.cpp's plain CPU buffers.

    The repacked / AMX "extra" CPU buffer types segfaulted in decode for Q4_0 files on this
    machine (llama-cpp-python 0.3.36 built natively on an AVX-512 + AMX CPU), so they are turned
    off (``use_extra_bufts = False``); llama.cpp then runs its generic quantized kernels.
    """
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise LowbitError(f"no GGUF file at {path}")
    import llama_cpp.llama as llama_module

    default = llama_cpp.llama_model_default_params

    def plain_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               logits_all=logits_all, n_threads=threads or torch.get_num_threads(), verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """exp(mean next-token NLL) of llama.cpp's logits over ``windows`` (n, seqlen), GPTQ convention
    (in a child process, see ``_in_child``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "windows.npy"
        np.save(ids, windows.numpy().astype(np.int64))
        return float(_in_child("perplexity_here", str(path), str(ids), str(threads or torch.get_num_threads())))


def logits(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits ``(n, seqlen, vocab)`` for each row of ``windows`` (a fresh context per row; own process)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "windows.npy", Path(tmp) / "logits.npy"
        np.save(ids, windows.numpy().astype(np.int64))
        _in_child("logits_here", str(path), str(ids), str(out), str(threads or torch.get_num_threads()))
        return np.load(out)


def logits_here(path: str, ids_file: str, out_file: str, threads: str) -> str:
    """``logits`` in this process (llama-cpp-python)."""
    windows = np.load(ids_file)
    seqlen = windows.shape[1]
    llm = open_model(path, seqlen, int(threads), logits_all=True)
    rows = []
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        rows.append(np.asarray(llm.scores[:seqlen], dtype=np.float32))
    np.save(out_file, np.stack(rows))
    return "ok"


def perplexity_here(path: str, ids_file: str, threads: str) -> float:
    """``perplexity`` in this process (one model per process)."""
    windows = np.load(ids_file)
    seqlen = windows.shape[1]
    llm = open_model(path, seqlen, int(threads), logits_all=True)
    nll, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        nll += window_nll(np.asarray(llm.scores[:seqlen]), row)
        count += seqlen - 1
    return math.exp(nll / count)


def _in_child(function: str, *args: str) -> str:
    """Run ``function(*args)`` of this module in a fresh Python and return what it printed.

    A llama.cpp crash cannot take the caller down, and each job's memory is its own."""
    code = f"import sys; from lowbit.runtime import {_require_backend()} as m; print(m.{function}(*sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LowbitError(f"llama.cpp {function} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().splitlines()[-1]


_FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
           "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
           "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
           "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
_GGML_TYPES = {"Q8_0": 8, "F16": 1, "F32": 0, "Q4_0": 2, "Q6_K": 14}


def quantize(src: str | Path, dst: str | Path, type_name: str, embed_type: str | None = "Q8_0",
             threads: int | None = None) -> Path:
    """llama.cpp's own quantization of ``src`` (an F32/F16 GGUF) to ``type_name``; the token
    embedding / output head use ``embed_type`` (None: llama.cpp's default choice)."""
    _require_backend()
    if type_name not in _FTYPES:
        raise LowbitError(f"llama.cpp quantization types here: {', '.join(_FTYPES)}; not {type_name!r}")
    embed = str(_GGML_TYPES[embed_type]) if embed_type else "-1"
    rc = _in_child("quantize_here", str(src), str(dst), _FTYPES[type_name], embed, str(threads or torch.get_num_threads()))
    if rc != "0" or not Path(dst).is_file():
        raise LowbitError(f"llama.cpp failed to quantize {src} to {type_name} (code {rc})")
    return Path(dst)


def quantize_here(src: str, dst: str, ftype: str, embed: str, threads: str) -> int:
    """``quantize`` in this process."""
    llama_cpp = _llama_cpp()
    params = set_quantize_params(llama_cpp.llama_model_quantize_default_params(), getattr(llama_cpp, ftype), embed,
                                 threads)
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


def set_quantize_params(params: Any, ftype: int, embed: str, threads: str) -> Any:
    """``llama_model_quantize_params`` (either binding's struct) set to ``ftype`` on ``threads`` threads, with the
    embedding / output head at GGML type ``embed`` (negative: llama.cpp's choice)."""
    params.ftype = ftype
    params.nthread = int(threads)
    if int(embed) >= 0:
        params.token_embedding_type = int(embed)
        params.output_tensor_type = int(embed)
    return params


@dataclass
class LlamaCppSpeed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int
    threads: int
    peak_rss_mb: float  # of the process that ran llama.cpp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def speed(path: str | Path, prompt: list[int], new_tokens: int = 64, repeats: int = 3,
          threads: int | None = None) -> LlamaCppSpeed:
    """Prefill (one batch) and greedy decode speed of llama.cpp, best of ``repeats`` (own process)."""
    threads = threads or torch.get_num_threads()
    out = _in_child("speed_here", str(path), ",".join(map(str, prompt)), str(new_tokens), str(repeats), str(threads))
    prefill, decode, rss = (float(v) for v in out.split(","))
    return LlamaCppSpeed(prefill, decode, len(prompt), new_tokens, threads, rss)


def time_generation(reset: Any, prefill: Any, step: Any, n_prompt: int, n_new: int, repeats: int) -> str:
    """Best-of-``repeats`` prefill and decode speed (after one warm-up run) and this process's peak RSS as
    ``"prefill_tok_s,decode_tok_s,peak_rss_mb"``:
    ``prefill()`` runs the prompt and returns the id it predicts, ``step(token, position)`` one decode step."""
    best_p, best_d = math.inf, math.inf
    for _ in range(repeats + 1):
        reset()
        t0 = time.perf_counter()
        nxt = prefill()
        t1 = time.perf_counter()
        for i in range(n_new):
            nxt = step(nxt, n_prompt + i)
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    from lowbit.eval.memory import peak_rss_mb

    return f"{n_prompt / best_p},{n_new / best_d},{peak_rss_mb()}"


def window_nll(logits: np.ndarray, row: list[int]) -> float:
    """Next-token NLL summed over one window from its ``(seqlen, vocab)`` logits (float64 log-softmax)."""
    lp = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits[:-1], dtype=np.float32)).double(), dim=-1)
    return -lp.gather(1, torch.tensor(row[1:]).unsqueeze(1)).sum().item()


def speed_here(path: str, prompt: str, new_tokens: str, repeats: str, threads: str) -> str:
    """``speed`` in this process: ``"prefill_tok_s,decode_tok_s,peak_rss_mb"``."""
    ids = [int(t) for t in prompt.split(",")]
    n_new = int(new_tokens)
    llm = open_model(path, len(ids) + n_new + 8, int(threads))

    def prefill() -> int:
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def step(token: int, _pos: int) -> int:
        llm.eval([token])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    return time_generation(llm.reset, prefill, step, len(ids), n_new, int(repeats))
