"""Equivalence transforms applied before quantization (SmoothQuant, ...): registry and base class."""

from lowbit.transforms.base import TRANSFORMS, BlockTransform, get_transform, register_transform
from lowbit.transforms import os_plus, rptq, smoothquant  # noqa: F401  (registers)
from lowbit.rotation import quarot  # noqa: F401,E402  (registers)

__all__ = ["TRANSFORMS", "BlockTransform", "get_transform", "register_transform"]
