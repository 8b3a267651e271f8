"""Quantized KV cache: configs and presets, the packing math, and the transformers cache."""

from lowbit.kvcache.cache import QuantizedKVCache, QuantizedKVLayer, check_kv_model
from lowbit.kvcache.config import KV_PRESETS, KVCacheConfig, as_kv_config, kv_preset, kv_setting

__all__ = ["KV_PRESETS", "KVCacheConfig", "QuantizedKVCache", "QuantizedKVLayer", "as_kv_config", "check_kv_model",
           "kv_preset", "kv_setting"]
