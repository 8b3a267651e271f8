"""Candidate weight formats for per-layer sensitivity and mixed precision: ``(bits, group size)``
pairs of int formats, their QuantSpec, a short label (``w4g64``, ``w8``) and their exact storage cost.

The cost counts what lowbit stores for an int layer (``lowbit.core.quant.storage_bits`` and the
methods' ``bits_per_weight``): ``bits`` per code, plus per group (per output row when there is no
group size) one scale at the spec's scale width (fp32 by default) and, for asymmetric specs, one
zero point of ``bits`` bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.spec import SCALE_BITS, QuantSpec, SpecError

DEFAULT_CANDIDATES: tuple[tuple[int, int | None], ...] = ((2, 64), (3, 64), (4, 64), (8, None))


@dataclass(frozen=True)
class Candidate:
    """One int format a layer may take: ``bits`` with groups of ``group_size`` (None: per output channel)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    @property
    def spec(self) -> QuantSpec:
        """The QuantSpec (signed when symmetric, as ``lowbit.recipe.recipe_from_flags`` builds it)."""
        try:
            if self.group_size:
                return QuantSpec(type="int", bits=self.bits, granularity="group", group_size=self.group_size,
                                 symmetric=self.symmetric, signed=self.symmetric)
            return QuantSpec(type="int", bits=self.bits, granularity="channel", symmetric=self.symmetric,
                             signed=self.symmetric)
        except SpecError as exc:
            raise LowbitError(f"candidate {self.label}: {exc}") from None

    @property
    def label(self) -> str:
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size else "") + ("" if self.symmetric else "-asym")

    def cost_bits(self, out_features: int, in_features: int) -> int:
        """Exact stored bits of an ``out x in`` weight in this format (codes, scales, zero points)."""
        spec = self.spec
        groups = out_features * (in_features // self.group_size if self.group_size else 1)
        per_group = SCALE_BITS[spec.scale_dtype] + (0 if self.symmetric else self.bits)
        return out_features * in_features * self.bits + groups * per_group

    def check_layer(self, name: str, in_features: int) -> None:
        """LowbitError when the group size does not divide the layer's input features."""
        if self.group_size and in_features % self.group_size:
            fits = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise LowbitError(f"candidate {self.label}: group size {self.group_size} does not divide {name}'s "
                              f"{in_features} input features; use one that does ({', '.join(map(str, fits)) or 'none'})")


def as_candidates(options: Iterable[tuple[int, int | None] | Candidate], symmetric: bool = True) -> list[Candidate]:
    """Candidates from ``(bits, group_size)`` pairs (or Candidates), validated, without duplicates."""
    out: list[Candidate] = []
    for o in options:
        c = o if isinstance(o, Candidate) else Candidate(int(o[0]), int(o[1]) if o[1] else None, symmetric)
        c.spec  # noqa: B018 - validates bits / group size now
        if c in out:
            raise LowbitError(f"candidate {c.label} is listed twice")
        out.append(c)
    if len(out) < 2:
        raise LowbitError(f"mixed precision needs at least two candidate formats, got {[c.label for c in out]}")
    return out


def parse_candidates(text: str, symmetric: bool = True) -> list[Candidate]:
    """``"2:64,3:64,4:64,8"`` -> candidates (``BITS[:GROUP]``, comma-separated; no group: per channel)."""
    pairs: list[tuple[int, int | None]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        bits, _, group = part.partition(":")
        try:
            pairs.append((int(bits), int(group) if group and int(group) > 0 else None))
        except ValueError:
            raise LowbitError(f"candidate {part!r} is not BITS or BITS:GROUP (e.g. 4:64 or 8)") from None
    return as_candidates(pairs, symmetric)


def by_label(candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    return {c.label: c for c in candidates}
