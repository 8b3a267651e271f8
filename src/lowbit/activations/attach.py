"""Put ``ActQuantizer``s on the inputs of linear layers (forward pre-hooks), find and remove them.

The quantizer is kept as a plain attribute, not a registered sub-module, so the model's state
dict (and every checkpoint written from it) is unchanged; exporters read it with
``act_quantizer_of``.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.activations.quantizer import ActQuantizer
from lowbit.spec import QuantSpec

_ATTR = "lowbit_input_quantizer"
_HANDLE = "_lowbit_input_quantizer_hook"


def _pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    q: ActQuantizer | None = module.__dict__.get(_ATTR)
    if q is None or not args or getattr(module, "applies_input_quantizer", False):
        return None  # modules with integer kernels (QuantLinear) quantize their input themselves
    return (q(args[0]), *args[1:])


def attach_input_quantizer(layer: torch.nn.Module, spec: QuantSpec | ActQuantizer) -> ActQuantizer:
    """Quantize every input of ``layer`` with ``spec`` (replacing a quantizer already there)."""
    q = spec if isinstance(spec, ActQuantizer) else ActQuantizer(spec)
    layer.__dict__[_ATTR] = q
    if _HANDLE not in layer.__dict__:
        layer.__dict__[_HANDLE] = layer.register_forward_pre_hook(_pre_hook)
    return q


def act_quantizer_of(layer: torch.nn.Module) -> ActQuantizer | None:
    """The input quantizer on ``layer``, or None."""
    return layer.__dict__.get(_ATTR)


def input_quantizers(model: torch.nn.Module) -> dict[str, ActQuantizer]:
    """Every input quantizer in ``model``, by layer name."""
    out = {}
    for name, m in model.named_modules():
        q = act_quantizer_of(m)
        if q is not None:
            out[name] = q
    return out


def detach_input_quantizers(model: torch.nn.Module) -> int:
    """Remove every input quantizer from ``model``; returns how many there were."""
    n = 0
    for m in model.modules():
        if _ATTR in m.__dict__:
            del m.__dict__[_ATTR]
            m.__dict__.pop(_HANDLE).remove()
            n += 1
    return n
