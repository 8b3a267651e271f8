"""llama.cpp through llama-cpp-python (optional extra ``llamacpp``): perplexity, quantization, speed.

The same token windows lowbit evaluates are fed to llama.cpp, so perplexities compare one to
one; llama.cpp's own quantizer (``llama_model_quantize``) provides the baseline GGUFs.
"""

from __future__ import annotations

import math
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


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def open_model(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = False) -> Any:
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise LowbitError(f"no GGUF file at {path}")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           logits_all=logits_all, n_threads=threads or torch.get_num_threads(), verbose=False)


def perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """exp(mean next-token NLL) of llama.cpp's logits over ``windows`` (n, seqlen), GPTQ convention."""
    seqlen = windows.shape[1]
    llm = open_model(path, seqlen, threads, logits_all=True)
    nll, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = torch.from_numpy(np.asarray(llm.scores[:seqlen], dtype=np.float32))
        lp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= lp.gather(1, torch.tensor(row[1:]).unsqueeze(1)).sum().item()
        count += seqlen - 1
    return math.exp(nll / count)


_FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
           "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
           "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}
_GGML_TYPES = {"Q8_0": 8, "F16": 1, "F32": 0, "Q4_0": 2, "Q6_K": 14}


def quantize(src: str | Path, dst: str | Path, type_name: str, embed_type: str | None = "Q8_0",
             threads: int | None = None) -> Path:
    """llama.cpp's own quantization of ``src`` (an F32/F16 GGUF) to ``type_name``; the token
    embedding / output head use ``embed_type`` (None: llama.cpp's default choice)."""
    llama_cpp = _llama_cpp()
    if type_name not in _FTYPES:
        raise LowbitError(f"llama.cpp quantization types here: {', '.join(_FTYPES)}; not {type_name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[type_name])
    params.nthread = threads or torch.get_num_threads()
    if embed_type is not None:
        params.token_embedding_type = _GGML_TYPES[embed_type]
        params.output_tensor_type = _GGML_TYPES[embed_type]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise LowbitError(f"llama.cpp failed to quantize {src} to {type_name} (code {rc})")
    return Path(dst)


@dataclass
class LlamaCppSpeed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def speed(path: str | Path, prompt: list[int], new_tokens: int = 64, repeats: int = 3,
          threads: int | None = None) -> LlamaCppSpeed:
    """Prefill (one batch) and greedy decode speed of llama.cpp, best of ``repeats``."""
    threads = threads or torch.get_num_threads()
    llm = open_model(path, len(prompt) + new_tokens + 8, threads)
    best_p, best_d = math.inf, math.inf
    for _ in range(repeats + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    return LlamaCppSpeed(len(prompt) / best_p, new_tokens / best_d, len(prompt), new_tokens, threads)
