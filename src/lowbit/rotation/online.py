"""Online rotations: a layer's input is multiplied by an orthogonal ``R`` at run time (pre-hook).

Used where a rotation cannot be folded into the op that produces the input (QuaRot's Hadamard on
the input of the MLP's down projection, after the non-linear gate): the layer's weight holds
``W R`` so that ``(x R)(W R)^T = x W^T``.  The hook runs before an input quantizer attached later,
so the quantizer sees the rotated, outlier-free input.  ``R`` is rebuilt from ``(size, seed)``.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.rotation.hadamard import random_hadamard

_ATTR = "lowbit_input_rotation"


def _hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    rot = module.__dict__.get(_ATTR)
    if rot is None or not args:
        return None
    x = args[0]
    r = rot["matrix"]
    if r.device != x.device or r.dtype != x.dtype:  # moved once, kept on the input's device
        r = rot["matrix"] = r.to(device=x.device, dtype=x.dtype)
    return (x @ r, *args[1:])


def attach_input_rotation(layer: torch.nn.Module, seed: int, fold: bool = True) -> torch.Tensor:
    """Rotate ``layer``'s input by ``random_hadamard(in_features, seed)`` at run time; with ``fold``, also
    rotate its weight columns so the layer computes the same function.  Returns ``R`` (float64)."""
    n = layer.weight.shape[1]
    r = random_hadamard(n, seed).to(layer.weight.device)
    if fold:
        with torch.no_grad():
            w = layer.weight
            w.copy_((w.double() @ r).to(w.dtype))
    layer.__dict__[_ATTR] = {"seed": seed, "size": n, "matrix": r.float()}
    layer.register_forward_pre_hook(_hook)
    return r


def input_rotations(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """``{layer name: {"seed", "size"}}`` of every online rotation in ``model``."""
    return {n: {"seed": m.__dict__[_ATTR]["seed"], "size": m.__dict__[_ATTR]["size"]}
            for n, m in model.named_modules() if _ATTR in m.__dict__}


def copy_input_rotation(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``dst`` (a replacement of ``src``, e.g. its packed form) the same run-time input rotation."""
    rot = src.__dict__.get(_ATTR)
    if rot is not None:
        dst.__dict__[_ATTR] = rot
        dst.register_forward_pre_hook(_hook)
