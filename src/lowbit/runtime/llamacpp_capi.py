"""llama.cpp through its C API as the ``llama-cpp-py-sync`` wheel ships it (a prebuilt ``libllama`` + cffi).

The second llama.cpp backend of ``lowbit.runtime.llamacpp``, used when llama-cpp-python (which
compiles llama.cpp at install, ~45 min on 2 cores) is not installed: the same three jobs
(perplexity of token windows, llama.cpp's own quantization, prefill / decode speed), each run in
a child process by ``llamacpp._in_child``.  Models load with llama.cpp's plain CPU buffers, as the
other backend does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lowbit.errors import LowbitError


def _lib() -> tuple[Any, Any]:
    try:
        from llama_cpp_py_sync._cffi_bindings import ffi, get_lib
    except ImportError:
        raise LowbitError("this llama.cpp backend needs llama-cpp-py-sync") from None
    lib = get_lib()
    lib.llama_backend_init()
    return ffi, lib


def available() -> bool:
    try:
        _lib()
    except Exception:  # missing wheel, or a libllama this system's libc cannot load
        return False
    return True


class _Context:
    """A model and a context of ``n_ctx`` tokens (all in one batch), freed on ``close``."""

    def __init__(self, path: str, n_ctx: int, threads: int) -> None:
        self.ffi, self.lib = _lib()
        mp = self.lib.llama_model_default_params()
        mp.use_extra_bufts = False  # plain CPU buffers, as the llama-cpp-python backend
        self.model = self.lib.llama_model_load_from_file(path.encode(), mp)
        if self.model == self.ffi.NULL:
            raise LowbitError(f"llama.cpp could not load {path}")
        cp = self.lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = self.lib.llama_init_from_model(self.model, cp)
        if self.ctx == self.ffi.NULL:
            raise LowbitError(f"llama.cpp could not create a {n_ctx}-token context for {path}")
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Run ``ids`` at positions ``start..``; the logits of every position (or of the last) as ``(n, vocab)``."""
        lib = self.lib
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
            if lib.llama_decode(self.ctx, batch) != 0:
                raise LowbitError("llama_decode failed")
        finally:
            lib.llama_batch_free(batch)
        if all_logits:
            ptr, rows = lib.llama_get_logits(self.ctx), len(ids)
        else:
            ptr, rows = lib.llama_get_logits_ith(self.ctx, -1), 1
        return np.frombuffer(self.ffi.buffer(ptr, 4 * rows * self.n_vocab), dtype=np.float32).reshape(rows, -1)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def perplexity_here(path: str, ids_file: str, threads: str) -> float:
    from lowbit.runtime.llamacpp import window_nll

    windows = np.load(ids_file)
    seqlen = windows.shape[1]
    c = _Context(path, seqlen, int(threads))
    nll, count = 0.0, 0
    for row in windows.tolist():
        c.reset()
        nll += window_nll(c.decode(row, 0, all_logits=True), row)
        count += seqlen - 1
    c.close()
    return math.exp(nll / count)


def logits_here(path: str, ids_file: str, out_file: str, threads: str) -> str:
    windows = np.load(ids_file)
    c = _Context(path, windows.shape[1], int(threads))
    rows = []
    for row in windows.tolist():
        c.reset()
        rows.append(c.decode(row, 0, all_logits=True).copy())
    c.close()
    np.save(out_file, np.stack(rows))
    return "ok"


def quantize_here(src: str, dst: str, ftype: str, embed: str, threads: str) -> int:
    from lowbit.runtime.llamacpp import set_quantize_params

    ffi, lib = _lib()
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    set_quantize_params(params, getattr(lib, ftype), embed, threads)
    return int(lib.llama_model_quantize(src.encode(), dst.encode(), params))


def speed_here(path: str, prompt: str, new_tokens: str, repeats: str, threads: str) -> str:
    from lowbit.runtime.llamacpp import time_generation

    ids = [int(t) for t in prompt.split(",")]
    n_new = int(new_tokens)
    c = _Context(path, len(ids) + n_new + 8, int(threads))

    def prefill() -> int:
        return int(c.decode(ids, 0, all_logits=False)[0].argmax())

    def step(token: int, pos: int) -> int:
        return int(c.decode([token], pos, all_logits=False)[0].argmax())

    out = time_generation(c.reset, prefill, step, len(ids), n_new, int(repeats))
    c.close()
    return out
