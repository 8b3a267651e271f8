"""Merge trained LoRA adapters into their base: each wrapped layer becomes a plain ``nn.Linear``.

The merged weight is the base weight as the adapters saw it in training (an NF4 ``FrozenQuantLinear``
dequantized, a lowbit-quantized layer's dequantized weight, or a full-precision weight) plus each active
adapter's ``B @ A * scaling``.  The result is an ordinary full-precision layer (a quantized base's codes
no longer describe it), which a recipe may round again.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.qat.qlora import FrozenQuantLinear


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a LoRA base layer computes with, in fp32."""
    if isinstance(layer, FrozenQuantLinear):
        return layer.dequantized_weight().float()
    if isinstance(layer, torch.nn.Linear):
        return layer.weight.detach().float()
    raise LowbitError(f"cannot merge LoRA into a {type(layer).__name__} base layer")


@torch.no_grad()
def merged_linear(lora: Any) -> torch.nn.Linear:
    """A plain linear holding ``lora``'s base weight plus its active adapters' deltas."""
    if lora.merged:
        raise LowbitError("the adapters are already merged into this layer's base weight")
    base = lora.get_base_layer()
    w = base_weight(base)
    for name in lora.active_adapters:
        if name in lora.lora_A:
            w = w + lora.get_delta_weight(name).float()
    dtype = lora.lora_A[lora.active_adapters[0]].weight.dtype
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, dtype=dtype, device=w.device)
    out.weight.copy_(w.to(dtype))
    if base.bias is not None:
        out.bias.copy_(base.bias.detach().to(dtype))
    return out


def merge_lora(model: Any) -> torch.nn.Module:
    """The transformers model under peft ``model`` with every LoRA layer merged (``merged_linear``), in place."""
    from peft.tuners.lora.layer import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise LowbitError("no LoRA layers to merge in this model")
    for name, layer in layers:
        base.set_submodule(name, merged_linear(layer))
    return base
