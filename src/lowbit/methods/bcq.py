"""BCQ: binary-coding quantization ``W ~ sum_i alpha_i B_i`` (``B_i in {-1, +1}``), the LUT-GEMM format.

Each group of a weight row (``granularity='channel'``: the whole row; ``'group'``: ``group_size``
consecutive input columns) is approximated by ``q = spec.bits`` sign planes with one alpha per
plane and group, fitted by :func:`lowbit.core.codebooks.bcq_fit` (greedy init, then alternating
least-squares alphas / best planes for ``iters`` steps).

With ``hessian_weighted`` (the default) the fit minimises the importance-weighted error
``sum_j H_jj (w_j - w~_j)^2`` with the diagonal of the layer Hessian ``H = 2/n X^T X`` as per-column
weight -- the diagonal approximation of the layer's output error -- so the method asks the
pipeline for calibration Hessians.  Columns whose inputs are never active (``H_jj = 0``) get
the weight ``DEAD_WEIGHT`` x the mean diagonal, so they are still fitted (as a tie-break; a group
of only dead columns gets the plain fit) without pulling on the active ones, whose weights are
their diagonal entries unchanged.  Without ``hessian_weighted`` the fit is
the plain squared error and the method is data-free.

Stored: codes at ``bits`` per weight plus ``q`` alphas per group at ``spec.scale_dtype``
(``storage_bits_per_weight``).  Artifacts: the ``CodebookQuantized`` result, its ``alphas``
``(G, q)`` and the LUT-GEMM sign ``planes`` ``(q, G, E)`` int8 from ``bcq_planes``.

Measured on smollm2-135m, 3 bits (wikitext2 calibration 16 x 512; 2 evaluation windows, fp
perplexity 18.84): group 64 with fp16 alphas (3.75 bits, the ``bcq-3bit`` recipe) -- mean layer
output error 0.0218 weighted vs 0.0415 unweighted (weighted lower on all 210 layers), perplexity
35.8 vs 456; per channel (3.14 bits) -- 0.0317 vs 0.0613, perplexity 86 vs 1.4e6.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.core.codebooks import bcq_planes, dequantize_codebook, quantize_codebook, storage_bits_per_weight
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.spec import QuantSpec

__all__ = ["BCQ", "DEAD_WEIGHT", "bcq_column_weights"]

DEAD_WEIGHT = 1e-6  # relative to mean(diag H): weight of columns with no input energy


def bcq_column_weights(hessian: torch.Tensor) -> torch.Tensor:
    """Per-column importance ``(in,)`` from a layer Hessian: ``diag(H)``, with dead columns
    (``H_jj = 0``) at ``DEAD_WEIGHT * mean(diag H)``; all ones when the Hessian is all zero."""
    d = hessian.diagonal().float().clamp_min(0.0)
    mean = float(d.mean())
    if not mean > 0:
        return torch.ones_like(d)
    return torch.where(d > 0, d, torch.full_like(d, DEAD_WEIGHT * mean))


@register_method
@dataclass
class BCQ(WeightMethod):
    """Binary-coding quantization (LUT-GEMM), optionally weighted by the Hessian diagonal."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(type="codebook", fmt="bcq", bits=3, granularity="group",
                                                                group_size=64, scale_dtype="float16"))
    iters: int = bounded(10, ge=0)
    hessian_weighted: bool = True

    name = "bcq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.type != "codebook" or self.spec.fmt != "bcq":
            raise LowbitError(
                f"bcq needs a spec with type: codebook, fmt: bcq (bits = number of sign planes), got "
                f"type {self.spec.type!r}, fmt {self.spec.fmt!r}"
            )
        if self.spec.granularity not in ("channel", "group"):
            raise LowbitError(
                f"bcq fits alphas per output channel or per group of input columns (granularity channel or "
                f"group), not {self.spec.granularity!r}"
            )
        if self.spec.scale_dtype not in ("float32", "float16", "bfloat16"):
            raise LowbitError(f"bcq stores alphas as float32, float16 or bfloat16, not {self.spec.scale_dtype}")

    @property  # type: ignore[override]
    def needs_hessian(self) -> bool:  # per instance: read by WeightMethod.statistics
        return self.hessian_weighted

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = layer.weight.data
        weights = None
        if self.hessian_weighted:
            if stats.hessian is None:
                raise LowbitError(f"bcq with hessian_weighted needs calibration inputs for {name}, but none reached it")
            weights = bcq_column_weights(stats.hessian).to(w.device)[None, :]
        qt = quantize_codebook(w, self.spec, weights=weights, iters=self.iters)
        return LayerResult(
            weight=dequantize_codebook(qt),
            bits_per_weight=storage_bits_per_weight(qt),
            form=qt,
            artifacts={"quantized": qt, "alphas": qt.codebook, "planes": bcq_planes(qt)},
        )
