"""Compression methods, one file each, registered by name (see ``lowbit.methods.base.METHODS``)."""

from lowbit.methods.base import METHODS, LayerResult, LayerStats, WeightMethod, get_method, register_method

# Importing the modules registers the methods.
from lowbit.methods import atom, awq, bcq, gptq, hqq, llmint8, olive, owq, qoq, rtn, spqr, zeroquant, zeroquant_fp  # noqa: F401,E402

__all__ = ["METHODS", "LayerResult", "LayerStats", "WeightMethod", "get_method", "register_method"]
