"""One Hessian solver for GPTQ-style methods (GPTQ, OWQ, Atom, SpQR; SparseGPT's mask hook).

Minimises ``||X W^T - X Q^T||^2`` one input column at a time (``H = 2/n X^T X``): after column
``j`` becomes ``q_j``, its error ``(w_j - q_j) / U_jj`` is spread over the later columns through row
``j`` of ``U``, the upper Cholesky factor of ``H^-1`` (Frantar et al., 2022).  The solver owns
everything the methods share:

* ``prepare``: fp32 working copies; inputs that never fired (``H_jj = 0``) get a zero weight
  column and a unit diagonal;
* ``solve``: permutation (act-order, outlier columns last, ...), dampening ``damp * mean(diag H)``
  raised x10 while the Cholesky factorisation fails, the column sweep with lazy block updates
  (``block_size``), full-precision but compensated trailing columns (``keep_last``), an optional
  mask hook at each block start (SparseGPT), and the inverse permutation.

What a column becomes is the business of a ``ColumnFormat`` (``lowbit.solvers.affine`` for int
grids; SpQR brings its own).  Pure tensor math: no modules, no devices chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from lowbit.errors import LowbitError

BlockMask = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class ColumnFormat(Protocol):
    """What each column of the sweep becomes; the solver calls it in sweep order."""

    def begin(self, w: torch.Tensor, hinv: torch.Tensor) -> None:
        """Once before the sweep: ``W`` in sweep order (do not modify) and ``U`` (for static groups, thresholds)."""

    def group_start(self, col: int) -> int:
        """Width of the group of parameters that starts at sweep column ``col`` (0: none starts here)."""

    def fit_group(self, col: int, block: torch.Tensor) -> None:
        """Fit the parameters of a group on its current columns ``block`` (every earlier update applied)."""

    def quantize(self, col: int, x: torch.Tensor) -> torch.Tensor:
        """The new value of sweep column ``col`` given its current value ``x`` (do not modify ``x``)."""


@dataclass
class Solution:
    """The solved weight in original column order and the dampening the factorisation needed."""

    weight: torch.Tensor  # (out, in): quantized columns dequantized, kept columns compensated
    damp: float


def prepare(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of ``(W, H)``; dead inputs (``H_jj = 0``): weight column zeroed, unit diagonal."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def act_order(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by descending ``diag(H)`` (GPTQ's act-order)."""
    return torch.argsort(torch.diag(hessian.detach().float()), descending=True)


def inverse_cholesky(h: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp*mean(diag) I)^-1``, raising ``damp`` x10 on failure."""
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(max_tries):
        try:
            chol = torch.linalg.cholesky(h + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            damp *= 10
    raise LowbitError(
        f"the Hessian stayed singular even with dampening {damp:g}; use more calibration samples"
    )


def solve(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: ColumnFormat,
    perm: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    keep_last: int = 0,
    on_block_start: BlockMask | None = None,
) -> Solution:
    """Sweep ``fmt`` over ``w`` (prepared, original order) with Hessian ``h``, columns in ``perm`` order.

    The last ``keep_last`` columns of the sweep are not quantized but receive every column's error
    (OWQ's fp16 columns); ``on_block_start`` is the mask hook of ``sweep``.  Inputs are not modified.
    """
    cols = w.shape[1]
    perm = torch.arange(cols, device=w.device) if perm is None else perm
    w, h = w[:, perm], h[perm][:, perm]
    hinv, damp_used = inverse_cholesky(h, damp)
    fmt.begin(w, hinv)
    sweep(w, hinv, fmt, block_size, cols - keep_last, on_block_start)
    return Solution(w[:, torch.argsort(perm)], damp_used)


def fixed_mask(mask: torch.Tensor) -> BlockMask:
    """A mask hook giving, block after block, the columns of a mask fixed in advance (in sweep order)."""
    start = [0]

    def hook(w_block: torch.Tensor, u_block: torch.Tensor) -> torch.Tensor:
        i1 = start[0]
        start[0] += w_block.shape[1]
        return mask[:, i1 : i1 + w_block.shape[1]].to(w_block.device)

    return hook


def sweep(
    w: torch.Tensor, hinv: torch.Tensor, fmt: ColumnFormat, block_size: int = 128, stop: int | None = None,
    on_block_start: BlockMask | None = None,
) -> torch.Tensor:
    """The column sweep with lazy block updates, in place on ``w`` (columns in sweep order); returns ``w``.

    Columns ``< stop`` become ``fmt.quantize``; all later ones, those at or after ``stop`` included,
    receive the error ``(x - new) / U_jj`` through ``U`` = ``hinv``.  Within a block of ``block_size``
    columns updates are applied at once; the rest of ``W`` is updated once per block.
    ``on_block_start(W_block, U_block)`` (the block's current columns and its square of ``U``, both
    read-only) may return a boolean mask of weights to prune: they become 0 whatever ``fmt`` gives,
    and their error is propagated like any other.
    """
    stop = w.shape[1] if stop is None else stop
    for i1 in range(0, stop, block_size):
        i2 = min(i1 + block_size, stop)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        mask = on_block_start(w1, hinv[i1:i2, i1:i2]) if on_block_start is not None else None
        _sweep_block(w, w1, err1, hinv, i1, i2, fmt, mask)
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def _sweep_block(
    w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int,
    fmt: ColumnFormat, mask: torch.Tensor | None,
) -> None:
    """Columns ``i1 .. i2`` one by one: new value, error into ``err1``, updates within the block."""
    hinv1 = hinv[i1:i2, i1:i2]
    diag = hinv1.diagonal()  # divide by its entries as tensors: a python float divisor is a reciprocal on CUDA
    for i in range(i2 - i1):
        width = fmt.group_start(i1 + i)
        if width:
            fmt.fit_group(i1 + i, _current_columns(w, w1, err1, hinv, i1, i2, i, width))
        x = w1[:, i]
        if mask is None:
            new = fmt.quantize(i1 + i, x)
        else:
            new = fmt.quantize(i1 + i, x.masked_fill(mask[:, i], 0)).masked_fill(mask[:, i], 0)
        e = torch.div(x - new, diag[i], out=err1[:, i])
        w1[:, i] = new
        w1[:, i + 1 :] -= torch.outer(e, hinv1[i, i + 1 :])


def _current_columns(
    w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int, i: int, n: int
) -> torch.Tensor:
    """Columns ``i1+i .. i1+i+n`` of W with every error update so far applied (lazy ones too)."""
    cur = w1[:, i : i + n]
    end = i1 + i + n
    if end > i2 and i2 < w.shape[1]:
        pending = err1[:, :i] @ hinv[i1 : i1 + i, i2:end]
        cur = torch.cat([cur, w[:, i2:end] - pending], dim=1)
    return cur


__all__ = ["ColumnFormat", "Solution", "prepare", "act_order", "inverse_cholesky", "solve", "sweep"]
