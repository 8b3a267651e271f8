"""GPT-2 style ``Conv1D`` layers as ``nn.Linear``, so every method and exporter sees one layer type.

transformers' ``Conv1D`` is a linear layer whose weight is stored transposed (``(in, out)``).
``convert_conv1d`` replaces each by a plain ``nn.Linear`` holding the usual ``(out, in)`` weight,
with state-dict hooks that write and read the ``(in, out)`` layout: checkpoints saved from the
model load in any transformers build, and transformers checkpoints load into it unchanged.
The layer stays of class ``nn.Linear`` (recipes and compressed-tensors match class names) and
carries ``lowbit_conv1d = True``.
"""

from __future__ import annotations

from typing import Any

import torch

MARK = "lowbit_conv1d"


def _save_transposed(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].t()


def _load_transposed(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    if key in state_dict and state_dict[key].dim() == 2:
        state_dict[key] = state_dict[key].t()


def is_conv1d(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` stands in for a GPT-2 style ``Conv1D`` (its checkpoint weight is transposed)."""
    return bool(getattr(layer, MARK, False))


def _to_linear(conv: torch.nn.Module) -> torch.nn.Linear:
    in_f, out_f = conv.weight.shape
    layer = torch.nn.Linear(in_f, out_f, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    layer.requires_grad_(conv.weight.requires_grad)
    layer.register_state_dict_post_hook(_save_transposed)
    layer.register_load_state_dict_pre_hook(_load_transposed)
    setattr(layer, MARK, True)
    return layer


def convert_conv1d(model: torch.nn.Module) -> int:
    """Replace every transformers ``Conv1D`` in ``model`` by an equal ``nn.Linear`` (in place); the count."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _to_linear(getattr(owner, child)))
    return len(names)
