"""Int affine grids as a column format of the Hessian solver (GPTQ, OWQ, Atom).

The quantized columns of the sweep are cut into *segments*, each with its own spec and group
width: GPTQ and OWQ have one, Atom two (its regular columns in ``spec`` groups, then its outlier
columns at 8 bits per row).  Within a segment, groups of ``group`` consecutive sweep columns (the
last may be partial) get per-row ``(scale, zero)`` fitted by min-max at their first column on the
error-updated weights.  With ``static_groups`` (one segment over every column) the groups are
instead consecutive *original* columns, fitted once before the sweep on the un-updated weights;
under act-order a column then looks its group up by its original index.

Codes follow ``lowbit.core.affine``: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x~ = s (q - z)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.affine import code_dtype, spec_qparams
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


@dataclass(frozen=True)
class Segment:
    """``width`` consecutive sweep columns quantized to ``spec`` in groups of ``group`` columns."""

    spec: QuantSpec
    width: int
    group: int

    @property
    def n_groups(self) -> int:
        return -(-self.width // self.group)


@dataclass
class AffineCodes:
    """The stored parts, in original column order."""

    codes: torch.Tensor  # (out, in) uint8 / int8 (int32 beyond 8 bits); 0 in columns not quantized
    scale: torch.Tensor  # (out, n_groups)
    zero: torch.Tensor  # (out, n_groups)
    g_idx: torch.Tensor  # (in,) int32 group of each column, -1 for columns not quantized


def check_int_spec(spec: QuantSpec, method: str, granularities: tuple[str, ...] | None = ("channel", "group", "tensor"),
                   ) -> None:
    """Raise a LowbitError unless ``spec`` is an int spec of one of ``granularities`` (None: any)."""
    if spec.type != "int":
        raise LowbitError(f"{method} quantizes to int grids; got a {spec.type} spec")
    if granularities is not None and spec.granularity not in granularities:
        raise LowbitError(f"{method} supports {', '.join(granularities)} granularity, not {spec.granularity}")


def group_width(spec: QuantSpec, width: int) -> int:
    """Columns per group of ``spec`` over ``width`` columns (all of them unless group granularity)."""
    return spec.group_size if spec.granularity == "group" else width


def group_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max ``(scale, zero)`` of a column block ``w`` (out x cols), shape ``(out,)``."""
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    if spec.granularity == "tensor":
        lo, hi = lo.amin().expand_as(lo), hi.amax().expand_as(hi)
    return spec_qparams(lo, hi, spec)


class AffineColumns:
    """Column format of int ``segments`` over the first sweep columns (see the module docstring)."""

    def __init__(self, perm: torch.Tensor, segments: list[Segment], static_groups: bool = False):
        if static_groups and (len(segments) != 1 or segments[0].width != perm.numel()):
            raise ValueError("static groups need one segment over every column")
        self.perm = perm
        self.order = perm.tolist()  # python ints: no tensor read (a GPU sync) per column
        self.segments = segments
        self.static = static_groups
        self._seg: list[Segment] = []  # segment of each quantized sweep column
        self._group: list[int] = []  # group of each quantized sweep column (dynamic groups)
        self._starts: dict[int, int] = {}  # sweep column -> width of the group starting there
        first, start = 0, 0
        for seg in segments:
            for c in range(seg.width):
                self._seg.append(seg)
                self._group.append(first + c // seg.group)
            for c in range(0, seg.width, seg.group):
                self._starts[start + c] = min(seg.group, seg.width - c)
            first, start = first + seg.n_groups, start + seg.width
        self.g_idx = [-1] * perm.numel()
        self.params: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self, w: torch.Tensor, hinv: torch.Tensor) -> None:
        rows, n_groups = w.shape[0], sum(s.n_groups for s in self.segments)
        self.qcols = torch.empty(rows, len(self._seg), dtype=w.dtype, device=w.device)  # float codes, sweep order
        self.scale = torch.zeros(rows, n_groups, dtype=w.dtype, device=w.device)
        self.zero = torch.zeros(rows, n_groups, dtype=w.dtype, device=w.device)
        if self.static:
            self._fit_static(w[:, torch.argsort(self.perm)])

    def _fit_static(self, w: torch.Tensor) -> None:
        """Parameters of every group of original columns, from ``w`` in original order."""
        seg = self.segments[0]
        self.static_params = []
        for g in range(seg.n_groups):
            s, z = group_qparams(w[:, g * seg.group : (g + 1) * seg.group], seg.spec)
            self.scale[:, g], self.zero[:, g] = s, z
            self.static_params.append((s, z))

    def group_start(self, col: int) -> int:
        return 0 if self.static else self._starts.get(col, 0)

    def fit_group(self, col: int, block: torch.Tensor) -> None:
        g = self._group[col]
        self.params = group_qparams(block, self._seg[col].spec)
        self.scale[:, g], self.zero[:, g] = self.params

    def quantize(self, col: int, x: torch.Tensor) -> torch.Tensor:
        orig, spec = self.order[col], self._seg[col].spec
        if self.static:
            g = orig // self.segments[0].group
            s, z = self.static_params[g]
        else:
            g = self._group[col]
            s, z = self.params  # type: ignore[misc]
        q = torch.div(x, s, out=self.qcols[:, col]).round_().add_(z).clamp_(spec.qmin, spec.qmax)
        self.g_idx[orig] = g
        return s * (q - z)

    def result(self) -> AffineCodes:
        """Codes, scales, zeros and ``g_idx`` after the sweep, in original column order."""
        qmin = min(s.spec.qmin for s in self.segments)
        qmax = max(s.spec.qmax for s in self.segments)
        codes = torch.zeros(self.qcols.shape[0], self.perm.numel(), dtype=code_dtype(qmin, qmax),
                            device=self.qcols.device)
        codes[:, self.perm[: self.qcols.shape[1]]] = self.qcols.to(codes.dtype)
        g_idx = torch.tensor(self.g_idx, dtype=torch.int32, device=self.qcols.device)
        return AffineCodes(codes, self.scale, self.zero, g_idx)


__all__ = ["Segment", "AffineCodes", "AffineColumns", "check_int_spec", "group_width", "group_qparams"]
