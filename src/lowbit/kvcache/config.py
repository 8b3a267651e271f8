"""``KVCacheConfig``: how a KV cache is quantized, with named presets.

* plain (``KV8``, ``KV4``, ``KV2``): keys and values per token, one range per head vector;
* KIVI (``KIVI4``, ``KIVI2``; Liu et al., 2024): keys per channel and values per token, groups of
  32, asymmetric, the most recent 128 tokens kept in full precision (``residual``);
* QuaRot (``KV4_QUAROT``; Ashkboos et al., 2024): keys and values per token, one asymmetric range
  per head vector, after a randomized Hadamard rotation of each head (``rotate``);
* KVQuant (``KVQUANT4``, ``KVQUANT3``, ``KVQUANT2``; Hooper et al., 2024): per-channel keys
  quantized before RoPE, 1% dense-and-sparse outliers kept in fp16, the first token (attention
  sink) in full precision, and a non-uniform level table per layer for keys and for values,
  fitted offline by Fisher-weighted k-means (``lowbit.kvcache.calibrate``); the ``_UNIFORM``
  variants keep plain integer codes (the paper's ablation).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lowbit.errors import LowbitError
from lowbit.fields import bounded, check_fields
from lowbit.safeio import read_text

KVBits = Literal[2, 3, 4, 8]
Axis = Literal["token", "channel"]
KV_BITS = get_args(KVBits)
AXES = get_args(Axis)


@dataclass(frozen=True)
class KVCacheConfig:
    """Bits, axes and group sizes of keys and values, plus the tokens kept in full precision.

    ``key_group`` / ``value_group``: channels per group for ``token`` axes (``None``: the whole
    head vector), tokens per group for ``channel`` axes.  ``residual``: most recent tokens kept
    in full precision (a multiple of the channel-axis group is flushed at a time).  ``sink``:
    first tokens kept in full precision.  ``pre_rope``: keys quantized before the rotary
    embedding.  ``outliers``: fraction of each group's values kept exactly (fp16).  ``intact``:
    IntactKV (Liu et al., 2024): the first ``intact`` tokens (the pivot tokens: BOS, attention
    sinks) keep the lossless keys and values of the full-precision model, given to the cache by
    ``set_pivots``.  ``rotate``: QuaRot's KV treatment, keys (after RoPE) and values multiplied by a
    randomized Hadamard matrix per head before quantization and by its transpose after (the same
    attention as rotating queries and keys online, and values through v_proj / o_proj).  ``nuq``: KVQuant's non-uniform codes; ``key_levels`` / ``value_levels`` hold
    one sorted table of ``2^bits`` code-unit levels per decoder layer, written by
    ``lowbit.kvcache.calibrate.calibrate_kv_levels``."""

    bits: KVBits = 8
    key_axis: Axis = "token"
    value_axis: Axis = "token"
    key_group: int | None = bounded(None, ge=1)
    value_group: int | None = bounded(None, ge=1)
    residual: int = bounded(0, ge=0)
    sink: int = bounded(0, ge=0)
    pre_rope: bool = False
    outliers: float = bounded(0.0, ge=0, lt=0.5)
    intact: int = bounded(0, ge=0)
    rotate: bool = False
    nuq: bool = False
    key_levels: tuple[tuple[float, ...], ...] | None = None
    value_levels: tuple[tuple[float, ...], ...] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        check_fields(self, "KV-cache ")  # types and ranges of every field (``lowbit.fields``)
        for what, axis, g in (("key", self.key_axis, self.key_group), ("value", self.value_axis, self.value_group)):
            if axis == "channel" and g is None:
                raise LowbitError(f"per-channel {what}s are grouped along tokens: set {what}_group (e.g. 32)")
        for what in ("key_levels", "value_levels"):
            table = getattr(self, what)
            if table is None:
                continue
            if not self.nuq:
                raise LowbitError(f"{what} are non-uniform level tables: set nuq: true to use them")
            table = tuple(tuple(float(v) for v in row) for row in table)
            object.__setattr__(self, what, table)  # lists from JSON become hashable tuples
            top = (1 << self.bits) - 1
            for i, row in enumerate(table):
                if len(row) != top + 1 or any(b < a for a, b in zip(row, row[1:])) or min(row) < 0 or max(row) > top:
                    raise LowbitError(f"{what}[{i}] must be {top + 1} sorted levels in [0, {top}] for {self.bits} "
                                      f"bits; recalibrate with lowbit.kvcache.calibrate_kv_levels")
        if (self.key_levels is None) != (self.value_levels is None) or (
                self.key_levels is not None and len(self.key_levels) != len(self.value_levels)):
            raise LowbitError("key_levels and value_levels come together, one table per layer each")

    @property
    def calibrated(self) -> bool:
        """True unless the setting needs level tables it does not have yet (``nuq`` without levels)."""
        return not self.nuq or self.key_levels is not None

    def group(self, which: str, head_dim: int) -> int:
        """Group size of ``which`` (``key`` / ``value``) for a model with ``head_dim``."""
        axis = self.key_axis if which == "key" else self.value_axis
        g = self.key_group if which == "key" else self.value_group
        if axis == "token":
            g = head_dim if g is None else min(g, head_dim)  # a group never spans two heads
            if head_dim % g:
                raise LowbitError(f"{which}_group {g} does not divide the model's head_dim {head_dim}")
        return g  # type: ignore[return-value]

    @property
    def fp_head(self) -> int:
        """First tokens kept in full precision: attention sinks and IntactKV's pivots."""
        return max(self.sink, self.intact)

    @property
    def flush_multiple(self) -> int:
        """Tokens leave the full-precision window in multiples of this (the channel-axis group)."""
        return math.lcm(*(g for axis, g in ((self.key_axis, self.key_group), (self.value_axis, self.value_group))
                          if axis == "channel"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (level tables as lists of lists)."""
        d = dataclasses.asdict(self)
        for what in ("key_levels", "value_levels"):
            if d[what] is not None:
                d[what] = [list(row) for row in d[what]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVCacheConfig":
        if "preset" in d:
            base = kv_preset(d["preset"]).to_dict()
            base.update({k: v for k, v in d.items() if k != "preset"})
            d = base
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LowbitError(f"unknown KV-cache option(s) {', '.join(sorted(map(str, unknown)))}; known: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)


def _kivi(bits: int) -> KVCacheConfig:
    return KVCacheConfig(bits=bits, key_axis="channel", value_axis="token", key_group=32, value_group=32,
                         residual=128, name=f"KIVI{bits}")


def _kvquant(bits: int, nuq: bool = True) -> KVCacheConfig:
    return KVCacheConfig(bits=bits, key_axis="channel", value_axis="token", key_group=128, residual=0, sink=1,
                         pre_rope=True, outliers=0.01, nuq=nuq, name=f"KVQUANT{bits}" + ("" if nuq else "_UNIFORM"))


KV_PRESETS: dict[str, KVCacheConfig] = {
    "KV8": KVCacheConfig(bits=8, name="KV8"),
    "KV4": KVCacheConfig(bits=4, name="KV4"),
    "KV2": KVCacheConfig(bits=2, name="KV2"),
    "KV4_CHANNEL": KVCacheConfig(bits=4, key_axis="channel", value_axis="channel", key_group=32, value_group=32,
                                 name="KV4_CHANNEL"),
    "KV4_QUAROT": KVCacheConfig(bits=4, rotate=True, name="KV4_QUAROT"),
    "KIVI4": _kivi(4),
    "KIVI2": _kivi(2),
    "KVQUANT4": _kvquant(4),
    "KVQUANT3": _kvquant(3),
    "KVQUANT2": _kvquant(2),
    "KVQUANT4_UNIFORM": _kvquant(4, nuq=False),
    "KVQUANT3_UNIFORM": _kvquant(3, nuq=False),
    "KVQUANT2_UNIFORM": _kvquant(2, nuq=False),
}


def kv_preset(name: str) -> KVCacheConfig:
    key = name.upper().replace("-", "_") if isinstance(name, str) else None
    if key not in KV_PRESETS:
        raise LowbitError(f"unknown KV-cache preset {name!r}; known: {', '.join(KV_PRESETS)}")
    return KV_PRESETS[key]


def as_kv_config(value: "str | dict[str, Any] | KVCacheConfig") -> KVCacheConfig:
    """A config from a preset name, a mapping of fields (optionally with ``preset``) or a config."""
    if isinstance(value, KVCacheConfig):
        return value
    if isinstance(value, str):
        return kv_preset(value)
    if isinstance(value, dict):
        return KVCacheConfig.from_dict(value)
    raise LowbitError(f"a KV-cache setting is a preset name ({', '.join(KV_PRESETS)}) or a mapping, "
                      f"got {type(value).__name__}")


KV_CACHE_FILE = "lowbit_kv_cache.json"  # a checkpoint's KV-cache setting, read by load_model
MAX_KV_FILE_BYTES = 16 << 20  # 8-bit level tables of an 80-layer model: about 1 MB of JSON


def read_kv_cache_file(directory: "str | Path") -> KVCacheConfig | None:
    """The KV-cache setting saved beside a checkpoint, or None."""
    path = Path(directory) / KV_CACHE_FILE
    if not path.is_file():
        return None
    text = read_text(path, MAX_KV_FILE_BYTES, "KV-cache setting")
    try:
        return as_kv_config(json.loads(text))
    except (ValueError, RecursionError, LowbitError) as e:
        raise LowbitError(f"{path} is not a valid KV-cache setting: {e}") from None


def kv_setting(model: Any, kv_cache: "str | dict[str, Any] | KVCacheConfig | None" = None) -> KVCacheConfig | None:
    """The KV-cache setting to use: ``kv_cache`` if given (``"none"``: full precision), else the
    model's own (``model.lowbit_kv_cache``, read from its checkpoint), else None."""
    if kv_cache is None:
        kv_cache = getattr(model, "lowbit_kv_cache", None)
    if kv_cache is None or (isinstance(kv_cache, str) and kv_cache.lower() == "none"):
        return None
    return as_kv_config(kv_cache)
