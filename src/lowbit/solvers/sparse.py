"""SparseGPT's mask selection as a column format of the Hessian solver (Frantar & Alistarh, 2023).

Pruning a weight is "rounding" it to 0, so SparseGPT is the GPTQ sweep with a format that zeroes the
weights of a mask chosen on the fly, optionally rounding the kept ones through an inner format (the
paper's joint sparsification and quantization in one sweep).  The mask is chosen by the OBS saliency
``w^2 / [U]_jj^2`` (``U`` the upper Cholesky factor of ``H^-1``) on the *current*, error-updated
weights:

* unstructured: at the start of every ``mask_block`` columns (the paper's adaptive mask selection,
  ``B_s = 128``), the ``sparsity`` fraction of lowest saliencies over the whole rows x columns block;
* N:M: at the start of every ``M`` columns, the ``N`` lowest of each row's ``M``.

A mask given in advance (an earlier pruning step's) is kept: its weights count as pruned first.
Pure tensor math; the sweep order must be the original column order (no act-order) so that N:M
groups are consecutive input columns.
"""

from __future__ import annotations

import torch

from lowbit.core.sparsity import lowest_n_of_m, lowest_overall
from lowbit.solvers.hessian import ColumnFormat


class SparseColumns:
    """Column format: prune by OBS saliency (module docstring), round the rest with ``inner`` if given."""

    def __init__(self, cols: int, sparsity: float = 0.5, pattern: tuple[int, int] | None = None,
                 mask_block: int = 128, inner: ColumnFormat | None = None,
                 prior: torch.Tensor | None = None):
        self.cols, self.sparsity, self.pattern, self.inner = cols, sparsity, pattern, inner
        self.width = pattern[1] if pattern is not None else mask_block
        self.prior = prior

    def begin(self, w: torch.Tensor, hinv: torch.Tensor) -> None:
        self.mask = torch.zeros_like(w, dtype=torch.bool)
        self.u_diag_sq = hinv.diagonal().square()
        if self.inner is not None:
            self.inner.begin(w, hinv)

    def _own_start(self, col: int) -> int:
        return min(self.width, self.cols - col) if col % self.width == 0 else 0

    def group_start(self, col: int) -> int:
        inner = self.inner.group_start(col) if self.inner is not None else 0
        return max(inner, self._own_start(col))

    def fit_group(self, col: int, block: torch.Tensor) -> None:
        own = self._own_start(col)
        if own:
            self._choose(col, block[:, :own])
        inner = self.inner.group_start(col) if self.inner is not None else 0
        if inner:
            part = block[:, :inner]
            known = self.mask[:, col : col + inner]  # the columns whose mask is chosen already
            self.inner.fit_group(col, part.masked_fill(known, 0.0))  # type: ignore[union-attr]

    def _choose(self, col: int, block: torch.Tensor) -> None:
        """The mask of columns ``col .. col + block width`` from their current values."""
        score = block.float().square() / self.u_diag_sq[col : col + block.shape[1]].unsqueeze(0)
        prior = None if self.prior is None else self.prior[:, col : col + block.shape[1]].to(block.device)
        if prior is not None:
            score = score.masked_fill(prior, float("-inf"))  # already pruned: counted first
        if self.pattern is not None:
            mask = lowest_n_of_m(score, *self.pattern)
        else:
            mask = lowest_overall(score, self.sparsity)
        if prior is not None:
            mask |= prior
        self.mask[:, col : col + block.shape[1]] = mask

    def quantize(self, col: int, x: torch.Tensor) -> torch.Tensor:
        pruned = self.mask[:, col]
        kept = x.masked_fill(pruned, 0.0)
        if self.inner is not None:
            kept = self.inner.quantize(col, kept).masked_fill(pruned, 0.0)
        return kept


__all__ = ["SparseColumns"]
