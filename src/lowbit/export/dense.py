"""The state dict a plain transformers model of the same config loads: packed and low-rank layers as dense
weights."""

from __future__ import annotations

import torch

from lowbit.lowrank_layers import dense_lowrank_state
from lowbit.packed.qlinear import QuantLinear

PACKED_BUFFERS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")


def dense_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ``QuantLinear``'s packed buffers replaced by its dequantized
    ``weight`` (in the layer's dtype), so a fake-quant checkpoint of a packed model holds real weights."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        prefix = f"{name}." if name else ""
        for b in PACKED_BUFFERS:
            state.pop(prefix + b, None)
        state[prefix + "weight"] = m.dequantized_weight().to(m.dtype).contiguous()
    return dense_lowrank_state(model, state)
