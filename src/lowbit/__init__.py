"""lowbit: make large language models smaller and faster, and measure what it costs.

Public API (imported lazily so that ``import lowbit`` stays cheap):

* ``load_model(ref, dtype=...)`` -> ``(model, tokenizer)``
* ``evaluate(model, tokenizer, ...)`` -> ``EvalResult``
* ``quantize(model, recipe, calib)`` -> ``QuantizationReport`` (in place); ``save_quantized``
* ``QuantSpec``, ``preset(name)``
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("lowbit.models.loading", "load_model"),
    "resolve_model": ("lowbit.models.loading", "resolve_model"),
    "evaluate": ("lowbit.eval.perplexity", "evaluate"),
    "quantize": ("lowbit.quantization", "quantize"),
    "save_quantized": ("lowbit.quantization", "save_quantized"),
    "load_recipe": ("lowbit.recipe", "load_recipe"),
    "QuantSpec": ("lowbit.spec", "QuantSpec"),
    "preset": ("lowbit.spec", "preset"),
    "PRESETS": ("lowbit.spec", "PRESETS"),
    "LowbitError": ("lowbit.errors", "LowbitError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
