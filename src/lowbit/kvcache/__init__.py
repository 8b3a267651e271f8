"""Quantized KV cache: configs and presets, the packing math, and the transformers cache."""

from lowbit.kvcache.calibrate import calibrate_kv_levels, ready_kv_setting
from lowbit.kvcache.cache import QuantizedKVCache, QuantizedKVLayer, check_kv_model, check_pivots, new_kv_cache
from lowbit.kvcache.config import KV_PRESETS, KVCacheConfig, as_kv_config, kv_preset, kv_setting

__all__ = ["KV_PRESETS", "calibrate_kv_levels", "ready_kv_setting", "KVCacheConfig", "QuantizedKVCache", "QuantizedKVLayer", "as_kv_config", "check_kv_model", "check_pivots", "new_kv_cache",
           "kv_preset", "kv_setting"]
