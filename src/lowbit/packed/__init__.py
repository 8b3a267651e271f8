"""Packed integer weights: a normal form for every method's output, and the module that runs it."""

from lowbit.packed.intweight import IntWeight, int_weight_of
from lowbit.packed.qlinear import QuantLinear, pack_model

__all__ = ["IntWeight", "QuantLinear", "int_weight_of", "pack_model"]
