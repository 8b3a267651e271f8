"""QuantSpec: one frozen dataclass that fully describes a quantization format, plus named presets.

A spec says *what* a tensor becomes (number format, range, granularity, how its range is
chosen); the methods in ``lowbit.methods`` decide *how* the values are picked.  Specs are
validated on construction and round-trip through JSON (``to_json`` / ``from_json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from lowbit.fields import check_fields

QUANT_TYPES = ("int", "float", "codebook")
# How a tensor is cut into groups sharing one set of parameters (see ``lowbit.core.granularity``).
GRANULARITY_KINDS: tuple[str, ...] = ("tensor", "channel", "token", "group", "block")
# Float element formats: name -> total bits.
FLOAT_FORMATS = {"e4m3": 8, "e5m2": 8, "e3m2": 6, "e2m3": 6, "e2m1": 4}
# Codebook formats: name -> allowed index bits (None: any 1..8).
CODEBOOK_FORMATS = {
    "nf4": (4,),
    "kmeans": None,
    "log": None,
    "binary": (1,),
    "ternary": (2,),
    "bcq": None,
}
OBSERVERS = ("minmax", "moving_minmax", "percentile", "mse", "kl", "symmetric_kl", "js")
SCALE_DTYPES = ("float32", "float16", "bfloat16", "e8m0", "e4m3")
SCALE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "e8m0": 8, "e4m3": 8}  # storage width of a scale
PADDING = ("error", "pad")


class SpecError(ValueError):
    """An impossible or inconsistent QuantSpec."""


@dataclass(frozen=True)
class QuantSpec:
    """Complete description of a quantization format.

    Attributes:
        type: ``int`` (uniform affine), ``float`` (FP8/FP6/FP4 element grids) or ``codebook``
            (NF4, k-means/LUT, logarithmic, binary/ternary, binary-coding).
        bits: bits per element (int: 1..8; float: implied by ``fmt``; codebook: index bits).
        fmt: float element format (``e4m3``, ``e5m2``, ``e3m2``, ``e2m3``, ``e2m1``) or
            codebook name (``nf4``, ``kmeans``, ``log``, ``binary``, ``ternary``, ``bcq``).
        symmetric: symmetric (zero point 0) or asymmetric (zero point from the minimum).
        signed: int range signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        granularity: ``tensor``, ``channel``, ``token``, ``group`` or ``block``.
        group_size: elements per group for ``group`` granularity.
        block: ``(rows, cols)`` tile for ``block`` granularity.
        padding: ``error`` when the group does not divide the axis, or ``pad`` for a partial
            last group.
        dynamic: activations only: parameters computed at run time (per token) rather than
            fixed from calibration.
        observer: how the clipping range is chosen (see ``lowbit.core.observers``).
        scale_dtype: storage dtype of scales (``e8m0`` for MX, ``e4m3`` for NVFP4 blocks).
        pow2_scale: round scales to powers of two (ZeroQuant-FP).
        full_range: symmetric signed int only: scale ``absmax / (2^(b-1) - 0.5)`` so the grid uses
            all ``2^b`` codes (the most negative one too, as llm-compressor and llama.cpp's Q4_0
            do) instead of ``absmax / (2^(b-1) - 1)``; one extreme may round half a step in.
        global_scale: an extra per-tensor fp32 scale above the block scales (NVFP4).
        double_quant: quantize the block scales themselves (QLoRA double quantization):
            ``(bits, group_size)`` of the second level, e.g. ``(8, 256)``.
    """

    type: str = "int"
    bits: int = 8
    fmt: str | None = None
    symmetric: bool = True
    signed: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    block: tuple[int, int] | None = None
    padding: str = "error"
    dynamic: bool = False
    observer: str = "minmax"
    scale_dtype: str = "float32"
    pow2_scale: bool = False
    full_range: bool = False
    global_scale: bool = False
    double_quant: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))
        if isinstance(self.double_quant, list):
            object.__setattr__(self, "double_quant", tuple(self.double_quant))
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> SpecError:
            return SpecError(f"invalid QuantSpec: {msg}")

        check_fields(self, "invalid QuantSpec: ", SpecError)  # each field's type (bits an integer, ...)
        if self.type not in QUANT_TYPES:
            raise bad(f"unknown type {self.type!r}; expected one of {', '.join(QUANT_TYPES)}")
        if self.type == "int":
            if not 1 <= self.bits <= 8:
                raise bad(f"int quantization needs 1 <= bits <= 8, got {self.bits}")
            if self.fmt is not None:
                raise bad(f"fmt {self.fmt!r} is only for float or codebook types")
            if self.bits == 1 and self.symmetric:
                raise bad("symmetric 1-bit int has no positive level; use symmetric=False or the 'binary' codebook")
            if self.double_quant is not None or self.global_scale:
                raise bad("double_quant and global_scale are for NF4 / NVFP4 style formats, not int")
            if self.full_range and not (self.symmetric and self.signed):
                raise bad("full_range applies to symmetric signed int grids; asymmetric grids already use every code")
        elif self.type == "float":
            if self.fmt not in FLOAT_FORMATS:
                raise bad(f"float type needs fmt in {', '.join(FLOAT_FORMATS)}, got {self.fmt!r}")
            if self.bits != FLOAT_FORMATS[self.fmt]:
                raise bad(f"fmt {self.fmt} has {FLOAT_FORMATS[self.fmt]} bits, but bits={self.bits}")
            if not self.symmetric or not self.signed:
                raise bad("float formats are signed and symmetric (set symmetric=True, signed=True)")
            if self.double_quant is not None:
                raise bad("double_quant is defined for codebook (NF4) scales, not float formats")
            if self.global_scale and self.scale_dtype != "e4m3":
                raise bad("global_scale (NVFP4) needs scale_dtype='e4m3' block scales")
            if self.pow2_scale and self.scale_dtype == "e4m3":
                raise bad("pow2_scale conflicts with e4m3 block scales; use scale_dtype='e8m0' for power-of-two scales")
        else:
            if self.fmt not in CODEBOOK_FORMATS:
                raise bad(f"codebook type needs fmt in {', '.join(CODEBOOK_FORMATS)}, got {self.fmt!r}")
            allowed = CODEBOOK_FORMATS[self.fmt]
            if allowed is not None and self.bits not in allowed:
                raise bad(f"codebook {self.fmt} uses {allowed[0]} bits, got bits={self.bits}")
            if allowed is None and not 1 <= self.bits <= 8:
                raise bad(f"codebook {self.fmt} needs 1 <= bits <= 8, got {self.bits}")
            if self.double_quant is not None and self.fmt in ("kmeans", "log", "bcq"):
                raise bad(f"double_quant applies to absmax block scales (nf4, binary, ternary), not {self.fmt}")
            if self.pow2_scale or self.global_scale or self.scale_dtype in ("e8m0", "e4m3"):
                raise bad("codebook formats store float scales: pow2_scale, global_scale and e8m0/e4m3 scales do not apply")
        if self.granularity not in GRANULARITY_KINDS:
            raise bad(f"unknown granularity {self.granularity!r}; expected one of {', '.join(GRANULARITY_KINDS)}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise bad("granularity 'group' needs a positive integer group_size (e.g. 128)")
        elif self.group_size is not None:
            raise bad(f"group_size is only meaningful with granularity 'group', not {self.granularity!r}")
        if self.granularity == "block":
            if self.block is None or len(self.block) != 2 or min(self.block) <= 0:
                raise bad("granularity 'block' needs block=(rows, cols) with positive sides")
        elif self.block is not None:
            raise bad(f"block is only meaningful with granularity 'block', not {self.granularity!r}")
        if self.padding not in PADDING:
            raise bad(f"padding must be one of {', '.join(PADDING)}, got {self.padding!r}")
        if self.observer not in OBSERVERS:
            raise bad(f"unknown observer {self.observer!r}; expected one of {', '.join(OBSERVERS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise bad(f"unknown scale_dtype {self.scale_dtype!r}; expected one of {', '.join(SCALE_DTYPES)}")
        if self.observer in ("kl", "symmetric_kl", "js") and self.granularity != "tensor":
            raise bad(f"the histogram observer {self.observer!r} calibrates one per-tensor range; use granularity 'tensor'")
        if self.dynamic and self.granularity not in ("token", "tensor", "group"):
            raise bad("dynamic quantization is computed per token, per tensor or per group at run time")
        if self.double_quant is not None:
            if len(self.double_quant) != 2 or not 1 <= self.double_quant[0] <= 8 or self.double_quant[1] <= 0:
                raise bad("double_quant must be (bits 1..8, group_size > 0), e.g. (8, 256)")

    # ------------------------------------------------------------------ derived values
    @property
    def qmin(self) -> int:
        """Smallest integer code (int type)."""
        if self.type != "int":
            raise SpecError(f"qmin is defined for int specs only, not {self.type}")
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code (int type)."""
        if self.type != "int":
            raise SpecError(f"qmax is defined for int specs only, not {self.type}")
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("block", "double_quant"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpecError(f"invalid QuantSpec: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QuantSpec":
        return cls.from_dict(json.loads(s))


def _int(bits: int, group: int | None = None, **kw: Any) -> QuantSpec:
    if group is None:
        return QuantSpec(type="int", bits=bits, granularity="channel", **kw)
    return QuantSpec(type="int", bits=bits, granularity="group", group_size=group, **kw)


PRESETS: dict[str, QuantSpec] = {
    "W8": _int(8),
    "W4_G128": _int(4, 128, symmetric=False, signed=False),
    "W4_G64": _int(4, 64, symmetric=False, signed=False),
    "W4_G32": _int(4, 32, symmetric=False, signed=False),
    "W3_G128": _int(3, 128, symmetric=False, signed=False),
    "W3_G64": _int(3, 64, symmetric=False, signed=False),
    "W2_G64": _int(2, 64, symmetric=False, signed=False),
    # activations: dynamic per-token on compressed-tensors' / llm-compressor's grid (absmax / 127.5)
    "A8_TOKEN": QuantSpec(type="int", bits=8, granularity="token", dynamic=True, full_range=True),
    "A4_TOKEN": QuantSpec(type="int", bits=4, granularity="token", dynamic=True, full_range=True),
    "A8_TENSOR": QuantSpec(type="int", bits=8, granularity="tensor"),
    "NF4": QuantSpec(type="codebook", fmt="nf4", bits=4, granularity="group", group_size=64, double_quant=(8, 256)),
    "FP8_E4M3": QuantSpec(type="float", fmt="e4m3", bits=8, granularity="channel"),
    "FP8_E4M3_TOKEN": QuantSpec(type="float", fmt="e4m3", bits=8, granularity="token", dynamic=True),
    "FP8_E4M3_TENSOR": QuantSpec(type="float", fmt="e4m3", bits=8, granularity="tensor"),
    "FP8_E5M2": QuantSpec(type="float", fmt="e5m2", bits=8, granularity="channel"),
    "FP6_E3M2": QuantSpec(type="float", fmt="e3m2", bits=6, granularity="channel"),
    "FP6_E2M3": QuantSpec(type="float", fmt="e2m3", bits=6, granularity="channel"),
    "FP4_E2M1": QuantSpec(type="float", fmt="e2m1", bits=4, granularity="group", group_size=32),
    "MXFP8": QuantSpec(type="float", fmt="e4m3", bits=8, granularity="group", group_size=32, scale_dtype="e8m0"),
    "MXFP6": QuantSpec(type="float", fmt="e2m3", bits=6, granularity="group", group_size=32, scale_dtype="e8m0"),
    "MXFP4": QuantSpec(type="float", fmt="e2m1", bits=4, granularity="group", group_size=32, scale_dtype="e8m0"),
    "NVFP4": QuantSpec(
        type="float", fmt="e2m1", bits=4, granularity="group", group_size=16, scale_dtype="e4m3", global_scale=True
    ),
    "BINARY": QuantSpec(type="codebook", fmt="binary", bits=1, granularity="channel"),
    "TERNARY": QuantSpec(type="codebook", fmt="ternary", bits=2, granularity="channel"),
}


def preset(name: str) -> QuantSpec:
    """Look up a named preset (case-insensitive)."""
    key = name.upper().replace("-", "_") if isinstance(name, str) else None
    if key not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]
