"""Error metrics between a reference tensor and its approximation (e.g. a weight and its dequantized copy).

All metrics flatten both tensors, compute in float64 (float32 on devices without float64, e.g.
MPS) whatever the input dtype, and return Python floats.  Shapes must match exactly; empty
tensors are rejected.  NaN or inf inputs propagate into the results.
"""

from __future__ import annotations

import math

import torch


def _prepare(ref: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ref, torch.Tensor) or not isinstance(approx, torch.Tensor):
        raise ValueError(f"metrics need two tensors, got {type(ref).__name__} and {type(approx).__name__}")
    if ref.shape != approx.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs approximation {tuple(approx.shape)}")
    if ref.numel() == 0:
        raise ValueError(f"metrics are undefined for empty tensors (shape {tuple(ref.shape)})")
    if ref.is_complex() or approx.is_complex():
        raise ValueError("metrics support real tensors only")
    dtype = torch.float32 if ref.device.type == "mps" else torch.float64
    return ref.detach().reshape(-1).to(dtype), approx.detach().reshape(-1).to(device=ref.device, dtype=dtype)


def mse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error ``mean((ref - approx)^2)``."""
    r, a = _prepare(ref, approx)
    return float(torch.mean((r - a) ** 2))


def max_abs_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Largest absolute elementwise difference."""
    r, a = _prepare(ref, approx)
    return float(torch.max(torch.abs(r - a)))


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10*log10(sum(ref^2) / sum((ref - approx)^2))`` in dB.

    ``+inf`` when the approximation is exact (including an all-zero reference), ``-inf`` when
    the reference is all zeros but the approximation is not.
    """
    r, a = _prepare(ref, approx)
    noise = float(torch.sum((r - a) ** 2))
    signal = float(torch.sum(r**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine of the angle between the flattened tensors, clamped to ``[-1, 1]``.

    Two all-zero tensors give 1.0; exactly one all-zero tensor gives 0.0.
    """
    r, a = _prepare(ref, approx)
    nr, na = float(torch.linalg.vector_norm(r)), float(torch.linalg.vector_norm(a))
    if nr == 0.0 or na == 0.0:
        return 1.0 if nr == na else 0.0
    cos = float(torch.dot(r, a)) / (nr * na)
    return cos if math.isnan(cos) else max(-1.0, min(1.0, cos))


def error_report(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """All four metrics: ``mse``, ``sqnr_db``, ``cosine_similarity``, ``max_abs_error``."""
    return {
        "mse": mse(ref, approx),
        "sqnr_db": sqnr_db(ref, approx),
        "cosine_similarity": cosine_similarity(ref, approx),
        "max_abs_error": max_abs_error(ref, approx),
    }
