"""Learnable-range fake quantization (LSQ, Esser et al. 2020; LSQ+'s learnable offset, Bhalgat et al. 2020).

``w_hat = s * (clamp(round_ste(w / s) + round_ste(z), qmin, qmax) - round_ste(z))`` with per-group scale
``s`` and integer zero point ``z`` (None: symmetric).  Autograd through this expression gives LSQ's
gradients exactly: ``d w_hat / d s = round(w/s) - w/s`` inside the range and ``qmin - z`` / ``qmax - z``
outside it, the identity to ``w`` inside the range and 0 outside (the clipped STE); the zero point
learns through its rounding's straight-through gradient, so the trained values store exactly as
integer codes.  ``grad_factor`` (LSQ's ``g = 1 / sqrt(N * Q_P)``, N the elements one scale serves)
keeps the scale's step size in proportion with the weights'.
"""

from __future__ import annotations

import math

import torch

from lowbit.core.ste import round_ste, scale_gradient


def lsq_grad_factor(per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * Q_P)`` for ``N`` elements per scale."""
    return 1.0 / math.sqrt(max(per_scale, 1) * max(qmax, 1))


def fake_quant_lsq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int,
                   grad_factor: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``x`` with learnable ``scale`` / ``zero`` (broadcast against ``x``)."""
    s = scale_gradient(scale, grad_factor) if grad_factor != 1.0 else scale
    if zero is None:
        return s * torch.clamp(round_ste(x / s), qmin, qmax)
    z = round_ste(scale_gradient(zero, grad_factor) if grad_factor != 1.0 else zero)
    return s * (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z)


def lsq_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The integer codes (and rounded zero points) ``fake_quant_lsq`` represents, without gradients."""
    with torch.no_grad():
        z = None if zero is None else torch.round(zero)
        q = torch.round(x / scale) + (0 if z is None else z)
        return torch.clamp(q, qmin, qmax), z
