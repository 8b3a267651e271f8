"""Greedy decoding without per-token overhead: a static KV cache, prefill in chunks, a compiled step.

gpt-fast's recipe on transformers models: the KV cache is one preallocated tensor per layer
(transformers' ``StaticCache``), so every decode step has the same shapes and ``torch.compile``
(inductor: C++ on CPU, CUDA graphs with ``mode="reduce-overhead"`` on GPU) turns the step into one
graph with no Python between layers.  The prompt is prefilled eagerly, ``prefill_chunk`` tokens at a
time (memory then follows the cache, not the prompt's activations).  Packed layers run the kernels
they chose (``QuantLinear.select_kernel``, done before compiling); the fp32 output head of a decode
step reads its weight with lowbit's native GEMV where that library is built (``DecodeLinear``; the
same for any other fp32 linear).

A model with a quantized KV-cache setting (``lowbit.kvcache``) keeps its own cache, whose shapes grow
with every token: it decodes eagerly, still on the native kernels (``compiled`` is then False and
``why_eager`` says so).  Compiling around that cache (its update left to Python) recompiled per layer and
per length and measured slower: KIVI4 on GPTQ W4 g64, 27.6 tok/s compiled against 35.8 eager.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.packed import native
from lowbit.runtime.speed import select_kernels

DECODE_TOKENS = 4  # a forward over at most this many tokens is a decode step (DecodeLinear, QuantLinear: the native GEMV)


class DecodeLinear(torch.nn.Linear):
    """An fp32 ``nn.Linear`` whose decode steps (at most ``DECODE_TOKENS`` tokens) use lowbit's native GEMV,
    which streams the weight at this machine's memory bandwidth where MKL's GEMV reaches a third of it
    (benchmarks/results/kernels.md); more tokens go to ``F.linear`` as before.  Made by swapping the class
    of an existing layer (``native_linears``): its parameters, names and tying are untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() // x.shape[-1] <= DECODE_TOKENS and x.dtype == w.dtype == torch.float32 and w.is_contiguous()
                and x.device.type == w.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return native.fgemv(x, w, self.bias)
        return F.linear(x, w, self.bias)


def native_linears(model: torch.nn.Module) -> int:
    """Make every plain fp32 CPU ``nn.Linear`` of ``model`` a ``DecodeLinear`` (in place); how many were.
    Nothing changes without the native library, and layers lowbit quantized in place (fake-quant,
    input quantizers, rotations) are left alone: their forward is not a plain matmul."""
    from lowbit.activations.attach import act_quantizer_of
    from lowbit.quantized_layers import is_quantized

    if not native.available():
        return 0
    count = 0
    for m in model.modules():
        if (type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
                and not is_quantized(m) and act_quantizer_of(m) is None and not m._forward_pre_hooks
                and not m._forward_hooks):
            m.__class__ = DecodeLinear
            count += 1
    return count


@dataclass
class Generation:
    """What one greedy generation produced and how long each part took."""

    tokens: list[int]  # the new tokens
    prefill_s: float  # the prompt's forward (time to first token)
    decode_s: float  # the timed decode steps
    decode_steps: int  # how many steps decode_s covers (all but the first token, less a compiling step)
    compile_s: float = 0.0  # the step that traced and compiled (first generation only; not in decode_s)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # per new token, when asked

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_steps > 0 and self.decode_s > 0 else 0.0


def _quantized_kv(model: Any) -> bool:
    from lowbit.kvcache import kv_setting

    return kv_setting(model, None) is not None


class StaticDecoder:
    """Greedy generation for one model with a static KV cache of ``max_len`` tokens.

    ``compile``: compile the one-token step with ``torch.compile`` (``fullgraph``, static shapes);
    the first generation pays the compile time (reported in ``Generation.compile_s``), later ones reuse
    the compiled step.  ``prefill_chunk``: prefill that many prompt tokens per forward.  ``mode``: torch.compile's
    mode (on a GPU, ``"reduce-overhead"`` captures the step in a CUDA graph)."""

    def __init__(self, model: Any, max_len: int, compile: bool = True, prefill_chunk: int | None = None,
                 mode: str | None = None):
        if max_len < 2:
            raise LowbitError(f"the static KV cache must hold at least 2 tokens, got {max_len}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise LowbitError(f"prefill chunk must be a positive number of tokens, got {prefill_chunk}")
        self.model, self.max_len, self.prefill_chunk = model, max_len, prefill_chunk
        self.device = next(model.parameters()).device
        select_kernels(model)  # kernel choice happens eagerly, before any tracing
        native_linears(model)
        self.why_eager = "a quantized KV cache grows with every token" if _quantized_kv(model) else None
        self.compiled = compile and self.why_eager is None
        self._step: Callable[..., torch.Tensor] = self._eager_step
        if self.compiled:
            self._step = torch.compile(self._eager_step, fullgraph=True, dynamic=False, mode=mode)
        self._warm = False
        self._cache: Any = None

    def _fresh_cache(self) -> Any:
        """An empty cache: the one static cache, zeroed (the compiled step keeps seeing the same tensors), or a
        new quantized KV cache."""
        from transformers import StaticCache

        from lowbit.runtime.speed import kv_cache_kwargs

        if self.why_eager is not None:
            return kv_cache_kwargs(self.model, torch.zeros(1, 1, dtype=torch.long), None, None, True)["past_key_values"]
        if self._cache is None:
            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        else:
            self._cache.reset()
        return self._cache

    def _eager_step(self, ids: torch.Tensor, position: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(input_ids=ids, cache_position=position, past_key_values=cache, use_cache=True)
        return out.logits[:, -1]

    def _steady(self) -> Any:
        """After the step compiled: skip re-checking dynamo's guards on every call (the model, the cache tensors
        and every input shape are the same at each step; checking ~500 tensors cost ~2 ms a step here)."""
        if not self.compiled:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run the prompt ``ids`` (1, n) into ``cache``; the logits after its last token."""
        n = ids.shape[1]
        chunk = self.prefill_chunk or n
        logits = None
        for start in range(0, n, chunk):
            part = ids[:, start:start + chunk]
            pos = torch.arange(start, start + part.shape[1], device=self.device)
            out = self.model(input_ids=part, cache_position=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
        return logits

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int, keep_logits: bool = False) -> Generation:
        """Greedy ``new_tokens`` after the prompt ``ids`` (1, n)."""
        ids = ids.to(self.device)
        if ids.shape[0] != 1:
            raise LowbitError(f"the static decoder generates for one prompt at a time, got a batch of {ids.shape[0]}")
        if ids.shape[1] + new_tokens > self.max_len:
            raise LowbitError(f"{ids.shape[1]} prompt tokens + {new_tokens} new ones exceed the static cache of "
                              f"{self.max_len}; raise max_len")
        cache = self._fresh_cache()
        t0 = time.perf_counter()
        logits = self.prefill(ids, cache)
        prefill_s = time.perf_counter() - t0
        tokens, kept = [int(logits.argmax(-1))], [logits[0].clone()] if keep_logits else []
        compile_s, pos = 0.0, ids.shape[1]
        if not self._warm and self.compiled and new_tokens > 1:  # the first call traces and compiles
            t0 = time.perf_counter()
            logits = self._step(torch.tensor([[tokens[-1]]], device=self.device),
                                torch.tensor([pos], device=self.device), cache)
            compile_s = time.perf_counter() - t0
            tokens.append(int(logits.argmax(-1)))
            kept += [logits[0].clone()] if keep_logits else []
            pos += 1
        self._warm = True
        t0 = time.perf_counter()
        with self._steady():
            while len(tokens) < new_tokens:
                logits = self._step(torch.tensor([[tokens[-1]]], device=self.device),
                                    torch.tensor([pos], device=self.device), cache)
                tokens.append(int(logits.argmax(-1)))
                kept += [logits[0].clone()] if keep_logits else []
                pos += 1
        decode_s = time.perf_counter() - t0
        steps = max(0, len(tokens) - (2 if compile_s else 1))
        return Generation(tokens[:new_tokens], prefill_s, decode_s, steps, compile_s, kept)
