"""Inference measurements for a transformers-style model: prefill and decode speed, memory, weight bytes.

Prefill: one forward over a ``prompt_tokens`` prompt that computes the last position's logits only (as
generation does; tokens / second).  Decode: greedy steps
with the KV cache after that prompt, ``new_tokens`` of them (tokens / second, mean over steps).
Each figure is the best of ``repeats`` runs after a warm-up.  Packed ``QuantLinear`` layers
pick their kernels first (``select_kernels``), so the numbers are those of the fastest path.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.eval.memory import peak_rss_mb
from lowbit.packed.qlinear import QuantLinear


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int
    weight_bytes: int  # bytes the model holds for its parameters and packed buffers
    peak_rss_mb: float
    kernels: dict[str, int]  # kernel name -> number of packed layers using it for decode
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Let every packed layer time its kernels; returns how many layers chose each decode kernel."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            k = m.select_kernel()["decode"]
            counts[k] = counts.get(k, 0) + 1
    return counts


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer; packed layers count what they hold
    (``QuantLinear.weight_bytes``: packed codes, scales, zeros and any kernel-specific copy)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes() + (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
            seen.update(t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()])
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() == 0:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def _prefill_seconds(model: Any, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.no_grad()
def _decode_seconds(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache after prefilling ``ids``."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def measure_speed(model: Any, prompt_ids: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> SpeedResult:
    """Prefill and decode speed of ``model`` on ``prompt_ids`` (1, n)."""
    kernels = select_kernels(model)
    ids = prompt_ids.to(next(model.parameters()).device)
    _prefill_seconds(model, ids[:, :8])  # warm-up
    prefill = min(_prefill_seconds(model, ids) for _ in range(repeats))
    decode = min(_decode_seconds(model, ids, new_tokens) for _ in range(repeats))
    return SpeedResult(
        prefill_tokens_per_s=ids.shape[1] / prefill, decode_tokens_per_s=new_tokens / decode,
        prompt_tokens=ids.shape[1], new_tokens=new_tokens, weight_bytes=weight_bytes(model),
        peak_rss_mb=peak_rss_mb(), kernels=kernels, threads=torch.get_num_threads(),
    )


@torch.no_grad()
def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, kv_cache: Any | None = None,
                  pivot_model: Any | None = None, prefill_chunk: int | None = None) -> str:
    """Greedy continuation of ``prompt`` (packed layers use their chosen kernels, fp32 linears the native GEMV).  ``kv_cache``: a
    quantized KV-cache setting (preset, mapping or config; default the model's own, ``"none"``: fp);
    ``pivot_model``: the full-precision model, for IntactKV pivots; ``prefill_chunk``: prefill the
    prompt that many tokens at a time (peak memory then follows the cache, not the prompt's activations)."""
    if prefill_chunk is not None and prefill_chunk < 1:
        raise LowbitError(f"prefill chunk must be a positive number of tokens, got {prefill_chunk}")
    from lowbit.runtime.decode import native_linears

    select_kernels(model)
    native_linears(model)  # fp32 linears (the output head first) on the native GEMV for decode steps
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         **kv_cache_kwargs(model, ids, kv_cache, pivot_model, prefill_chunk is not None),
                         **({} if prefill_chunk is None else {"prefill_chunk_size": prefill_chunk}))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def kv_cache_kwargs(model: Any, ids: torch.Tensor, kv_cache: Any | None = None, pivot_model: Any | None = None,
                    always: bool = False) -> dict[str, Any]:
    """``{"past_key_values": cache}`` for generating from ``ids`` when a KV-cache setting applies, else ``{}``
    (``always``: an fp ``DynamicCache`` then, as chunked prefill needs a cache passed in)."""
    from transformers import DynamicCache

    from lowbit.kvcache import kv_setting, new_kv_cache

    cfg = kv_setting(model, kv_cache)
    if cfg is None:
        return {"past_key_values": DynamicCache(config=model.config)} if always else {}
    return {"past_key_values": new_kv_cache(model, cfg, ids, pivot_model)}
