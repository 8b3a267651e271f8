"""Equivalence transforms applied before quantization (SmoothQuant, ...): registry and base class."""

from lowbit.transforms.base import TRANSFORMS, BlockTransform, get_transform, register_transform
from lowbit.transforms import os_plus, quarot, rptq, smoothquant  # noqa: F401  (registers)

__all__ = ["TRANSFORMS", "BlockTransform", "get_transform", "register_transform"]
