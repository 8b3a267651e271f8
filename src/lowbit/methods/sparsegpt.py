"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

The GPTQ column sweep on the shared Hessian solver, where each pruned weight's error is spread over
the columns not yet visited through the inverse Hessian's Cholesky factor, and the mask is chosen on
the fly by ``w^2 / [U]_jj^2`` every ``block_size`` columns (unstructured, the paper's adaptive mask
selection over the whole block) or every M columns (``pattern: "N:M"``); see
``lowbit.solvers.sparse``.  Two uses::

    methods:                                    # prune, then any quantizer that keeps the mask
      - {method: sparsegpt, options: {sparsity: 0.5}}
      - {method: gptq, spec: W4_G64}

    methods:                                    # the paper's joint mode: prune and round in one sweep
      - {method: sparsegpt, spec: W4_G64, options: {sparsity: 0.5, quantize: true}}

Without ``quantize`` it is a non-rounding step: the weights stay in full precision, updated, and the mask
travels to the steps after it.  A layer no calibration token reached is pruned by magnitude instead
(nothing to reconstruct from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.fields import bounded
from lowbit.methods.base import LayerResult, LayerStats, PreparedLayer, WeightMethod, register_method
from lowbit.methods.gptq import swept_layer_result
from lowbit.methods.pruning import Pruner
from lowbit.solvers.affine import AffineColumns, Segment, check_int_spec, group_width
from lowbit.solvers.hessian import prepare, solve
from lowbit.solvers.sparse import SparseColumns
from lowbit.spec import QuantSpec


@dataclass
class SparseGPTResult:
    """The pruned (and, jointly, rounded) weight and its mask; int parts when rounded."""

    weight: torch.Tensor  # (out, in) float32, exact zeros where ``mask``
    mask: torch.Tensor  # (out, in) bool, True = pruned
    damp_used: float
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    spec: QuantSpec | None = None,
    mask: torch.Tensor | None = None,
) -> SparseGPTResult:
    """Prune ``weight`` (out, in) with Hessian ``(in, in)``; with an int ``spec``, round the kept weights in the
    same sweep.  ``mask``: weights already pruned (kept pruned).  Pure tensor math."""
    w, h = prepare(weight, hessian)
    cols = w.shape[1]
    inner = None
    if spec is not None:
        check_int_spec(spec, "SparseGPT's joint quantization")
        inner = AffineColumns(torch.arange(cols, device=w.device), [Segment(spec, cols, group_width(spec, cols))])
    fmt = SparseColumns(cols, sparsity, pattern, block_size, inner, mask)
    sol = solve(w, h, fmt, None, damp, block_size)
    out = SparseGPTResult(sol.weight, fmt.mask, sol.damp)
    if inner is not None:
        parts = inner.result()
        out.codes, out.scale, out.zero, out.g_idx = parts.codes, parts.scale, parts.zero, parts.g_idx
    return out


@register_method
@dataclass
class SparseGPT(Pruner):
    """SparseGPT pruning (module docstring); ``quantize: true`` rounds the kept weights to ``spec`` jointly."""

    block_size: int = bounded(128, ge=1)  # lazy-update block, also the adaptive mask-selection block
    damp: float = bounded(0.01, gt=0)
    quantize: bool = False

    name = "sparsegpt"
    needs_hessian = True
    accepts_activations = True  # when it rounds (quantize: true); the recipe check refuses it otherwise

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize:
            check_int_spec(self.spec, "sparsegpt with quantize: true")

    def rounds(self) -> bool:
        return self.quantize

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        super().validate_layer(name, layer)
        if self.quantize:
            WeightMethod.validate_layer(self, name, layer)  # the spec's groups divide the layer

    def fallback(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> WeightMethod | None:
        return super().fallback(name, layer, stats) if self.quantize else None

    def _how(self) -> str:
        return self.pattern or "unstructured"

    def _prune(self, name: str, w: torch.Tensor, stats: LayerStats, spec: QuantSpec | None) -> SparseGPTResult:
        hessian = self.require_hessian(name, stats)
        return sparsegpt_prune(w, hessian, self.layer_sparsity(name), self.n_of_m(), self.block_size, self.damp,
                               spec, stats.mask)

    @torch.no_grad()
    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        w = self.linear_weight(name, layer).data
        if stats.nsamples == 0 or stats.hessian is None:  # nothing to reconstruct from: by magnitude
            mask = self.select(name, w.abs().float(), False, stats.mask)
            w.masked_fill_(mask, 0.0)
            return PreparedLayer(mask=mask, note=self.note(mask, self._how()) + "; no calibration tokens: by magnitude")
        res = self._prune(name, w, stats, None)
        w.copy_(res.weight.to(w.dtype))
        return PreparedLayer(mask=res.mask, note=self.note(res.mask, self._how()))

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        w = layer.weight.data
        res = self._prune(name, w, stats, self.spec)
        assert res.codes is not None and res.scale is not None and res.zero is not None and res.g_idx is not None
        return swept_layer_result(w, res.weight, res.codes, res.scale, res.zero, res.g_idx, self.spec, mask=res.mask,
                                  damp=res.damp_used)
