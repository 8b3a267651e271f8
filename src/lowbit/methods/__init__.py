"""Compression steps, one file each, registered by name (see ``lowbit.methods.base.METHODS``).

Every module of this package is imported here, so a new step is one new file with a
``@register_method`` class: no list to edit.
"""

import importlib
import pkgutil

from lowbit.methods.base import (METHODS, LayerResult, LayerStats, PreparedLayer, WeightMethod, get_method,
                                 register_method)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the module's steps

__all__ = ["METHODS", "LayerResult", "LayerStats", "PreparedLayer", "WeightMethod", "get_method", "register_method"]
