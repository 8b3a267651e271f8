"""The straight-through estimator: one forward value, the gradient of another.

Every fake-quantizer in lowbit (integer, float, codebook; weights, activations, KV cache) takes its
gradient through ``straight_through``: the forward value is the quantized tensor, bit-exactly; the
backward pass hands the incoming gradient to the unquantized input unchanged, or only where a mask
says so (the clipped STE: zero gradient outside the quantization range).
"""

from __future__ import annotations

from typing import Any

import torch


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        if mask is not None and ctx.needs_input_grad[0]:
            ctx.save_for_backward(mask)
        ctx.masked = mask is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if ctx.masked:
            (mask,) = ctx.saved_tensors
            return grad * mask, None, None
        return grad, None, None


def straight_through(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` in the forward pass; ``d/dx`` is the identity (times ``mask`` where given) in the backward."""
    return _StraightThrough.apply(x, y.detach(), mask)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (LSQ's rounding)."""
    return straight_through(x, torch.round(x))


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``factor`` in the backward (LSQ's ``g``)."""
    return (x - x * factor).detach() + x * factor
