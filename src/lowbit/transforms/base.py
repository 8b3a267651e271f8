"""The contract of block transforms: rewrite a decoder block so that it computes the same function
but quantizes better (scales migrated between ops, channels reordered, ...).

A transform is a dataclass config plus ``apply_block(ctx)``, called by the sequential pipeline
for every block before the weight methods see it, with the block's calibration inputs and the
methods assigned to its layers (so it can score candidates with the formats they will use).
What it leaves for a layer's input quantizer (an OS+ shift, RPTQ's channel clusters) it keeps
itself, by full layer name, and applies in ``input_quantizer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lowbit.errors import LowbitError
from lowbit.fields import check_fields
from lowbit.registry import lookup, registrar

OPTIONS_ERROR = "invalid options for transform {!r}: "


@dataclass
class BlockTransform:
    """Base class of block transforms (see module docstring)."""

    name: ClassVar[str] = ""
    records: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        """Check each option against its field's type and bounds (``lowbit.fields``); subclasses call
        this first."""
        check_fields(self, OPTIONS_ERROR.format(self.name))

    def check_model(self, model: Any) -> None:
        """Raise a LowbitError before any work if this transform cannot rewrite ``model``."""

    def apply_model(self, model: Any) -> None:
        """Whole-model rewrite before the blocks are visited (default: nothing)."""

    def apply_block(self, ctx: Any) -> None:
        """Rewrite one block, given its calibration inputs and the methods of its layers (default: nothing)."""

    def input_quantizer(self, name: str, quantizer: Any) -> Any:
        """The input quantizer of layer ``name`` (full name) adapted to what this transform did to the
        layer's inputs (a shift taken off, channel clusters); default: unchanged."""
        return quantizer

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]


TRANSFORMS: dict[str, type[BlockTransform]] = {}


register_transform = registrar(TRANSFORMS)


def get_transform(name: str, options: dict[str, Any] | None = None) -> BlockTransform:
    """Instantiate a registered transform; clear errors for unknown names and options."""
    cls = lookup(TRANSFORMS, "transform", name, {} if options is None else options)
    try:
        return cls(**(options or {}))
    except (TypeError, ValueError) as exc:
        raise LowbitError(f"{OPTIONS_ERROR.format(name)}{exc}") from None
