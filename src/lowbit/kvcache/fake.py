"""A KV cache for training: keys and values fake-quantized with straight-through gradients.

``QuantizedKVCache`` stores packed codes and is what inference uses; its dequantized keys are written
into buffers, so no gradient reaches ``k_proj`` / ``v_proj`` through it.  ``FakeQuantKVCache`` gives
the attention the same values (``fake_quant_kv`` runs the same quantize / dequantize) as differentiable
tensors, for quantization-aware training with a quantized cache (LLM-QAT).  It takes the per-token
settings (``KV8``, ``KV4``, ``KV2``, optionally grouped): their codes of one token do not depend on the
tokens around it, so a training forward over a whole window sees exactly what inference sees.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.errors import LowbitError
from lowbit.kvcache.cache import check_kv_model, head_dim_of
from lowbit.kvcache.config import KVCacheConfig, as_kv_config
from lowbit.kvcache.quant import fake_quant_kv


def check_trainable_kv(cfg: KVCacheConfig) -> None:
    """LowbitError unless ``cfg`` is a per-token setting that training can fake-quantize."""
    unsupported = [what for what, on in (
        ("channel-axis keys or values", "channel" in (cfg.key_axis, cfg.value_axis)),
        ("a full-precision residual window", cfg.residual > 0), ("sink tokens", cfg.sink > 0),
        ("pre-RoPE keys", cfg.pre_rope), ("outliers", cfg.outliers > 0), ("IntactKV pivots", cfg.intact > 0),
        ("rotation", cfg.rotate), ("non-uniform levels", cfg.nuq)) if on]
    if unsupported:
        raise LowbitError(f"KV-cache setting {cfg.name} has {', '.join(unsupported)}: quantization-aware training "
                          "fake-quantizes per-token caches only; use KV8, KV4 or KV2")


class FakeQuantKVLayer(DynamicLayer):
    """One decoder layer's cache: incoming keys and values quantize-dequantized, gradients straight through."""

    def __init__(self, cfg: KVCacheConfig, head_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.key_group, self.value_group = cfg.group("key", head_dim), cfg.group("value", head_dim)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        k = fake_quant_kv(key_states, self.cfg.bits, "token", self.key_group)
        v = fake_quant_kv(value_states, self.cfg.bits, "token", self.value_group)
        return super().update(k, v, *args, **kwargs)


class FakeQuantKVCache(Cache):
    """transformers ``Cache`` of ``FakeQuantKVLayer``s: pass it as ``past_key_values`` in a training forward."""

    def __init__(self, model: Any, config: "KVCacheConfig | str | dict[str, Any]") -> None:
        check_kv_model(model)
        cfg = as_kv_config(config)
        check_trainable_kv(cfg)
        head_dim = head_dim_of(model)
        super().__init__(layers=[FakeQuantKVLayer(cfg, head_dim) for _ in range(model.config.num_hidden_layers)])
        self.kv_config = cfg
