"""Granularity: how a tensor is cut into the groups that share one set of quantization parameters.

Every quantizer in ``lowbit.core`` works on a 2-D view ``xg`` of shape ``(G, E)``: ``G`` groups
of ``E`` elements, one (scale, zero) or codebook scale per row of ``xg``.  ``group_view`` builds
that view for any granularity and ``ungroup`` puts it back, so the quantizers themselves never
care about the layout.

Conventions (tensors of rank >= 2 are treated as ``(rows, cols)`` after flattening all leading
dimensions into rows; a 1-D tensor is one row):

* ``tensor``  one group holding every element.
* ``channel`` one group per row (a weight's output channel, ``W`` being ``out x in``).
* ``token``   one group per row (an activation's token, ``X`` being ``tokens x features``).
* ``group``   ``group_size`` consecutive elements along the last axis of each row.
* ``block``   2-D tiles of ``block = (block_rows, block_cols)``.

When ``group_size`` (or a block side) does not divide the axis, ``padding`` decides:
``"error"`` (default) raises, ``"pad"`` fills the last partial group by repeating its last real
element (this leaves min, max and absmax of the group unchanged) and ``ungroup`` drops the fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.spec import GRANULARITY_KINDS  # the format description lives in spec (below core)

GranularityKind = Literal["tensor", "channel", "token", "group", "block"]
PaddingPolicy = Literal["error", "pad"]


@dataclass(frozen=True)
class GroupLayout:
    """What ``ungroup`` needs to restore the original tensor from its ``(G, E)`` view."""

    shape: tuple[int, ...]
    kind: str
    rows: int
    cols: int
    padded_cols: int
    padded_rows: int
    block: tuple[int, int] | None = None
    group_size: int | None = None

    @property
    def num_groups(self) -> int:
        """Number of rows of the ``(G, E)`` view."""
        if self.kind == "tensor":
            return 1
        if self.kind in ("channel", "token"):
            return self.rows
        if self.kind == "group":
            assert self.group_size is not None
            return self.rows * (self.padded_cols // self.group_size)
        assert self.block is not None
        return (self.padded_rows // self.block[0]) * (self.padded_cols // self.block[1])


def _as_rows_cols(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if x.dim() == 0:
        x = x.reshape(1, 1)
    elif x.dim() == 1:
        x = x.reshape(1, -1)
    else:
        x = x.reshape(-1, x.shape[-1])
    return x, x.shape[0], x.shape[1]


def _pad_last(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    size = x.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return x
    edge = x.narrow(dim, size - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = extra
    return torch.cat([x, edge.repeat(*reps)], dim=dim)


def _check_divides(size: int, step: int, what: str, padding: PaddingPolicy) -> None:
    if step <= 0:
        raise ValueError(f"{what} must be a positive integer, got {step}")
    if size % step and padding != "pad":
        raise ValueError(
            f"{what} {step} does not divide the axis of length {size}; choose a {what} that "
            f"divides {size} or pass padding='pad' to quantize the last partial group on its own"
        )


def group_view(
    x: torch.Tensor,
    kind: GranularityKind,
    group_size: int | None = None,
    block: tuple[int, int] | None = None,
    padding: PaddingPolicy = "error",
) -> tuple[torch.Tensor, GroupLayout]:
    """Return ``(xg, layout)`` with ``xg`` of shape ``(G, E)``: one quantization group per row."""
    if kind not in GRANULARITY_KINDS:
        raise ValueError(f"unknown granularity {kind!r}; expected one of {', '.join(GRANULARITY_KINDS)}")
    shape = tuple(x.shape)
    x2, rows, cols = _as_rows_cols(x)
    if kind == "tensor":
        return x2.reshape(1, -1), GroupLayout(shape, kind, rows, cols, cols, rows)
    if kind in ("channel", "token"):
        return x2, GroupLayout(shape, kind, rows, cols, cols, rows)
    if kind == "group":
        if group_size is None:
            raise ValueError("granularity 'group' needs group_size (e.g. 32, 64 or 128)")
        _check_divides(cols, group_size, "group_size", padding)
        xp = _pad_last(x2, group_size, 1)
        layout = GroupLayout(shape, kind, rows, cols, xp.shape[1], rows, group_size=group_size)
        return xp.reshape(-1, group_size), layout
    # block
    if block is None:
        raise ValueError("granularity 'block' needs block=(block_rows, block_cols)")
    br, bc = block
    _check_divides(rows, br, "block rows", padding)
    _check_divides(cols, bc, "block cols", padding)
    xp = _pad_last(_pad_last(x2, bc, 1), br, 0)
    pr, pc = xp.shape
    tiles = xp.reshape(pr // br, br, pc // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)
    return tiles, GroupLayout(shape, kind, rows, cols, pc, pr, (br, bc))


def ungroup(xg: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Inverse of ``group_view``: restore the original shape, dropping any padding."""
    if layout.kind == "block":
        assert layout.block is not None
        br, bc = layout.block
        pr, pc = layout.padded_rows, layout.padded_cols
        x2 = xg.reshape(pr // br, pc // bc, br, bc).permute(0, 2, 1, 3).reshape(pr, pc)
    else:
        x2 = xg.reshape(layout.rows, layout.padded_cols)
    x2 = x2[: layout.rows, : layout.cols]
    return x2.reshape(layout.shape)


def param_shape(layout: GroupLayout) -> tuple[int, ...]:
    """Natural shape of per-group parameters (scales/zeros) for a given layout.

    tensor -> ``(1,)``; channel/token -> ``(rows, 1)``; group -> ``(rows, n_groups)``;
    block -> ``(row_blocks, col_blocks)``.
    """
    if layout.kind == "tensor":
        return (1,)
    if layout.kind in ("channel", "token"):
        return (layout.rows, 1)
    if layout.kind == "group":
        assert layout.group_size is not None
        return (layout.rows, layout.padded_cols // layout.group_size)
    assert layout.block is not None
    return (layout.padded_rows // layout.block[0], layout.padded_cols // layout.block[1])


def valid_mask(layout: GroupLayout, device: torch.device | str | None = None) -> torch.Tensor | None:
    """1.0 on real elements of the ``(G, E)`` view, 0.0 on the fill of ``padding='pad'``; None without fill."""
    if layout.padded_cols == layout.cols and layout.padded_rows == layout.rows:
        return None
    numel = layout.rows * layout.cols
    idx, _ = group_view(torch.arange(numel, device=device).reshape(layout.shape), layout.kind,  # type: ignore[arg-type]
                        layout.group_size, layout.block, "pad")
    flat = idx.reshape(-1)
    pos = torch.arange(flat.numel(), device=device)
    first = torch.full((numel,), flat.numel(), device=device).scatter_reduce(0, flat, pos, "amin")
    return (first[flat] == pos).float().reshape(idx.shape)
