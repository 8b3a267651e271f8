"""A quantized KV cache in transformers' cache interface: ``model.generate(past_key_values=...)``
and any forward with ``past_key_values`` read keys and values after they pass the quantizer.

Each decoder layer keeps: the first ``sink`` tokens in full precision, the quantized body as
packed ``KVBlock``s, and the most recent tokens (at most ``residual`` plus one flush group) in
full precision.  ``update`` appends the new tokens, moves whole groups from the full-precision
window into packed blocks, and returns the dequantized body between the two full-precision parts.
With ``pre_rope`` the keys are un-rotated before quantization and rotated again on the way out, so
their per-channel ranges are those of the raw projections (KVQuant).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.arch import types_with
from lowbit.errors import LowbitError
from lowbit.kvcache.config import KVCacheConfig, as_kv_config
from lowbit.kvcache.quant import PackedKV
from lowbit.rotation.hadamard import random_hadamard

KV_MODEL_TYPES = types_with("llama_layout")  # one full-attention cache layer per block, rotate-half RoPE (lowbit.arch)

RopeFn = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def rope_undo(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos - _rotate_half(x) * sin


class KVScratch:
    """The buffers a cache's layers return their keys and values in.  Layers run one after another
    and attention consumes what ``update`` returns before the next layer's ``update``, so under
    ``torch.no_grad`` every layer reuses the same two buffers (grown a quarter at a time) instead of
    allocating its full keys and values at every step; with autograd each call gets fresh tensors.
    The buffers are flat, so every view handed out is contiguous."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def take(self, b: int, h: int, t: int, d: int, dtype: torch.dtype, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``(b, h, t, d)`` tensors to fill (views of the shared buffers when autograd is off)."""
        if torch.is_grad_enabled():
            return (torch.empty(b, h, t, d, dtype=dtype, device=device),
                    torch.empty(b, h, t, d, dtype=dtype, device=device))
        n, k = b * h * t * d, self.keys
        if k is None or k.numel() < n or k.dtype != dtype or k.device != device:
            grow = k is not None and k.numel() < n  # a longer context: room for a quarter more
            cap = max(n, k.numel() * 5 // 4) if grow else max(n, 0 if k is None else k.numel())
            self.keys = torch.empty(cap, dtype=dtype, device=device)
            self.values = torch.empty(cap, dtype=dtype, device=device)
        return self.keys[:n].view(b, h, t, d), self.values[:n].view(b, h, t, d)  # contiguous, as attention likes

    def nbytes(self) -> int:
        """Bytes of the two shared buffers (0 before the first ``take`` without autograd)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's quantized cache (see module docstring)."""

    def __init__(self, config: KVCacheConfig, rope: RopeFn | None = None, index: int = 0,
                 scratch: "KVScratch | None" = None) -> None:
        super().__init__()
        self.scratch = scratch or KVScratch()
        if config.pre_rope and rope is None:
            raise LowbitError("pre-RoPE key quantization needs the model's rotary embedding")
        self.cfg = config
        self.rope = rope
        self.key_levels = self.value_levels = None  # KVQuant's non-uniform tables of this layer
        if config.key_levels is not None:
            self.key_levels = torch.tensor(config.key_levels[index], dtype=torch.float32)
            self.value_levels = torch.tensor(config.value_levels[index], dtype=torch.float32)
        self.cumulative_length = 0
        self.sink_k: torch.Tensor | None = None
        self.sink_v: torch.Tensor | None = None
        self.res_k: torch.Tensor | None = None
        self.res_v: torch.Tensor | None = None
        self.pivot_k: torch.Tensor | None = None  # IntactKV: the fp model's keys / values of the first tokens
        self.pivot_v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.sink_k, self.sink_v = empty, value_states[:, :, :0]
        self.res_k, self.res_v = empty, value_states[:, :, :0]
        self.keys, self.values = empty, value_states[:, :, :0]  # transformers reads .keys for shape/device
        head_dim = key_states.shape[-1]
        c = self.cfg
        # QuaRot: a randomized Hadamard per head, applied before quantization and undone after
        self.rotation = kv_rotation(head_dim) if c.rotate else None
        self.body_k = PackedKV(c.bits, c.key_axis, c.group("key", head_dim), c.outliers, self.key_levels)
        self.body_v = PackedKV(c.bits, c.value_axis, c.group("value", head_dim), c.outliers, self.value_levels)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        have = self.sink_k.shape[-2]
        need = min(self.cfg.fp_head - have, key_states.shape[-2])
        if need > 0:
            k, v = key_states[:, :, :need], value_states[:, :, :need]
            if self.pivot_k is not None:  # IntactKV: the pivots' lossless keys and values replace the model's
                k = self.pivot_k[:, :, have:have + need].to(k.dtype)
                v = self.pivot_v[:, :, have:have + need].to(v.dtype)
            self.sink_k = torch.cat([self.sink_k, k], dim=-2)
            self.sink_v = torch.cat([self.sink_v, v], dim=-2)
            key_states, value_states = key_states[:, :, need:], value_states[:, :, need:]
        self.res_k = torch.cat([self.res_k, key_states], dim=-2)
        self.res_v = torch.cat([self.res_v, value_states], dim=-2)
        self._flush()
        return self._full()

    def _flush(self) -> None:
        """Move whole groups beyond the residual window from full precision into packed blocks."""
        m = self.cfg.flush_multiple
        n = (self.res_k.shape[-2] - self.cfg.residual) // m * m
        if n <= 0:
            return
        k = self.res_k[:, :, :n]
        if self.cfg.pre_rope:
            cos, sin = self.rope(self.cfg.fp_head + self.body_k.tokens, n, k)
            k = rope_undo(k.float(), cos, sin)
        v = self.res_v[:, :, :n]
        if self.rotation is not None:
            k, v = k.float() @ self.rotation, v.float() @ self.rotation
        self.body_k.append(k)
        self.body_v.append(v)
        self.res_k, self.res_v = self.res_k[:, :, n:], self.res_v[:, :, n:]

    def _full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token held: sink, dequantized body, residual window."""
        if not self.body_k.tokens:
            return torch.cat([self.sink_k, self.res_k], dim=-2), torch.cat([self.sink_v, self.res_v], dim=-2)
        s, n, r = self.sink_k.shape[-2], self.body_k.tokens, self.res_k.shape[-2]
        b, h, _, d = self.res_k.shape
        k, v = self.scratch.take(b, h, s + n + r, d, self.dtype, self.device)
        k[:, :, :s], v[:, :, :s] = self.sink_k, self.sink_v
        k[:, :, s + n:], v[:, :, s + n:] = self.res_k, self.res_v
        body_k, body_v = k[:, :, s:s + n], v[:, :, s:s + n]
        self.body_k.dequantize_into(body_k)
        self.body_v.dequantize_into(body_v)
        if self.rotation is not None or self.cfg.pre_rope:
            self._restore(body_k, body_v)
        return k, v

    def _restore(self, body_k: torch.Tensor, body_v: torch.Tensor, chunk: int = 256) -> None:
        """Undo the rotation and re-apply RoPE to the dequantized body in place, ``chunk`` tokens at a time."""
        for a in range(0, body_k.shape[2], chunk):
            k, v = body_k[:, :, a:a + chunk].float(), body_v[:, :, a:a + chunk]
            if self.rotation is not None:
                k = k @ self.rotation.T
                body_v[:, :, a:a + chunk] = v.float() @ self.rotation.T
            if self.cfg.pre_rope:
                cos, sin = self.rope(self.cfg.fp_head + a, k.shape[2], k)
                k = rope_apply(k, cos, sin)
            body_k[:, :, a:a + chunk] = k

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held: packed blocks with their scales and outliers, plus the full-precision tokens."""
        if not self.is_initialized:
            return 0
        return self._fp_nbytes() + self.body_k.nbytes() + self.body_v.nbytes()

    def allocated_nbytes(self) -> int:
        """Bytes allocated for this layer's cache: ``nbytes`` plus the packed blocks' spare capacity
        (the shared output buffers are the whole cache's: ``QuantizedKVCache.allocated_nbytes``)."""
        if not self.is_initialized:
            return 0
        return self._fp_nbytes() + self.body_k.allocated_nbytes() + self.body_v.allocated_nbytes()

    def _fp_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.res_k, self.res_v))

    def crop(self, tokens_to_remove: int) -> None:
        raise LowbitError("a quantized KV cache cannot be cropped (assisted or speculative decoding); use the fp cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LowbitError("beam search is not supported with a quantized KV cache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise LowbitError("expanding the batch of a quantized KV cache is not supported; pass the batch directly")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise LowbitError("selecting batch rows of a quantized KV cache is not supported")


def rope_fn(model: Any) -> RopeFn:
    rotary = model.get_submodule("model.rotary_emb")

    def fn(start: int, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + n, device=like.device).unsqueeze(0)
        cos, sin = rotary(like.float(), pos)
        return cos.unsqueeze(1).float(), sin.unsqueeze(1).float()  # (1, 1, n, head_dim)

    return fn


def kv_rotation(head_dim: int) -> torch.Tensor:
    """The fixed randomized Hadamard matrix (float32) that ``rotate`` applies to every head."""
    return random_hadamard(head_dim, seed=0).float()


def head_dim_of(model: Any) -> int:
    """Channels per attention head of ``model``."""
    mc = model.config
    return getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads


def check_kv_model(model: Any) -> None:
    """LowbitError unless lowbit knows ``model``'s attention cache layout."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in KV_MODEL_TYPES:
        raise LowbitError(f"KV-cache quantization knows the attention layout of {', '.join(KV_MODEL_TYPES)}; "
                          f"model type {mt!r} is not among them")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and mt != "llama":
        raise LowbitError(f"{mt} with sliding-window attention is not supported by the quantized KV cache")


class QuantizedKVCache(Cache):
    """transformers ``Cache`` whose every layer is a ``QuantizedKVLayer`` for ``config``."""

    def __init__(self, model: Any, config: "KVCacheConfig | str | dict[str, Any]") -> None:
        check_kv_model(model)
        cfg = as_kv_config(config)
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx and cfg.residual + cfg.fp_head >= ctx:
            raise LowbitError(f"the full-precision window ({cfg.residual} recent + {cfg.fp_head} first tokens) is not "
                              f"smaller than the model's context of {ctx} tokens: nothing would be quantized")
        head_dim = head_dim_of(model)
        cfg.group("key", head_dim), cfg.group("value", head_dim)  # group sizes that do not fit: error now
        n_layers = model.config.num_hidden_layers
        if not cfg.calibrated:
            raise LowbitError(f"{cfg.name} uses non-uniform levels calibrated offline: fit them first with "
                              "lowbit.kvcache.calibrate_kv_levels(model, config, windows) (the command line does "
                              f"this itself), or use {cfg.name}_UNIFORM for plain integer codes")
        if cfg.key_levels is not None and len(cfg.key_levels) != n_layers:
            raise LowbitError(f"the KV-cache level tables were calibrated for {len(cfg.key_levels)} layers, but the "
                              f"model has {n_layers}: recalibrate on this model")
        rope = rope_fn(model) if cfg.pre_rope else None
        self.scratch = KVScratch()  # one pair of output buffers shared by all layers
        super().__init__(layers=[QuantizedKVLayer(cfg, rope, i, self.scratch) for i in range(n_layers)])
        self.kv_config = cfg

    def nbytes(self) -> int:
        """Bytes the cache's content takes (what a packed cache must store)."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_nbytes(self) -> int:
        """Bytes the cache holds allocated: ``nbytes``, the packed blocks' spare capacity, and the one
        pair of dequantized output buffers all layers share."""
        return sum(layer.allocated_nbytes() for layer in self.layers) + self.scratch.nbytes()

    @torch.no_grad()
    def set_pivots(self, fp_model: Any, ids: torch.Tensor) -> None:
        """IntactKV: run ``fp_model`` (the full-precision model) on the first ``intact`` tokens of ``ids``
        and give each layer their lossless keys and values, used in place of the quantized model's."""
        n = self.kv_config.intact
        if n == 0:
            return
        if ids.shape[-1] < n:
            raise LowbitError(f"IntactKV keeps {n} pivot tokens but the input has only {ids.shape[-1]}")
        from transformers import DynamicCache

        fp_cache = DynamicCache(config=fp_model.config)
        fp_model(input_ids=ids[:, :n].to(next(fp_model.parameters()).device), past_key_values=fp_cache, use_cache=True)
        for layer, fp_layer in zip(self.layers, fp_cache.layers):
            layer.pivot_k, layer.pivot_v = fp_layer.keys, fp_layer.values


def check_pivots(cfg: KVCacheConfig, pivot_model: Any | None) -> None:
    """LowbitError when an IntactKV setting has no full-precision model to take the pivots from."""
    if cfg.intact and pivot_model is None:
        raise LowbitError(f"IntactKV (intact: {cfg.intact}) takes the pivot tokens' keys and values from the "
                          "full-precision model: pass it as pivot_model (--pivot-model on the command line)")


def new_kv_cache(model: Any, cfg: KVCacheConfig, ids: torch.Tensor, pivot_model: Any | None = None) -> QuantizedKVCache:
    """A fresh quantized cache for a forward or ``generate`` on ``ids`` (IntactKV pivots filled in)."""
    check_pivots(cfg, pivot_model)
    cache = QuantizedKVCache(model, cfg)
    if cfg.intact:
        cache.set_pivots(pivot_model, ids)
    return cache
