"""One validator for every user-set dataclass field: method and transform options, KV-cache
settings, quantization specs.

Types come from the fields' annotations (resolved with ``typing.get_type_hints``, so string
annotations work): ``int`` (not bool), ``float`` (an int is fine, NaN is not), ``bool``, ``str``,
``Literal[...]`` choices, unions / ``Optional``, ``tuple[...]`` / ``list[...]`` (a YAML list),
``dict[...]`` and classes.  Numeric ranges are declared next to the field with :func:`bounded`::

    damp: float = bounded(0.01, gt=0)
    max_shrink: float = bounded(0.5, ge=0, lt=1)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Union

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Bounds:
    """A numeric interval: ``ge`` / ``gt`` below, ``le`` / ``lt`` above (None: open).  Infinite values
    are refused unless the upper bound is ``le=math.inf`` (an explicit "inf means off")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, v: float) -> bool:
        if math.isinf(v) and self.le != math.inf:
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        """``in [0, 1)``, ``> 0``, ``>= 1 (or .inf)`` ..."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        le = self.le if self.le != math.inf else None
        high = f"{_num(le)}]" if le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        elif high:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        else:
            text = ""
        return text + (" (or .inf)" if self.le == math.inf else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with ``default`` whose numeric values must lie within the given bounds."""
    return dataclasses.field(default=default, metadata={"bounds": Bounds(ge=ge, gt=gt, le=le, lt=lt)})


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as parsed from YAML/JSON or passed in Python) fits the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and _items_conform(value, args, fixed=origin is tuple)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a typing construct this validator does not know: not checked


def _items_conform(value: tuple | list, args: tuple, fixed: bool) -> bool:
    if not args:
        return True
    if fixed and args[-1] is not Ellipsis:
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
    return all(conforms(v, args[0]) for v in value)


def describe(tp: Any, bounds: Bounds | None = None) -> str:
    """What ``tp`` accepts, in the words of a YAML user (``an integer``, ``true or false``, ``a number in
    [0, 1]`` ...); ``bounds`` qualify its numbers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              type(None): "null", None: "null", Any: "anything"}
    if tp in (int, float) and bounds is not None:
        return f"{simple[tp]} {bounds.describe()}"
    if tp in simple:
        return simple[tp]
    if origin in (Union, types.UnionType):
        parts = [describe(a, bounds) for a in args]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list (each item {describe(args[0])})" if args else "a list"
    if origin is dict:
        return "a mapping"
    return f"a {getattr(tp, '__name__', tp)}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(f: dataclasses.Field, tp: Any, value: Any) -> str | None:
    """Why ``value`` does not fit field ``f`` of annotation ``tp`` (None: it fits)."""
    bounds: Bounds | None = f.metadata.get("bounds")
    if not conforms(value, tp):
        return f"{f.name} must be {describe(tp, bounds)}"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if bounds is not None and is_number and not bounds.contains(value):
        return f"{f.name} must be {'finite and ' if math.isinf(value) else ''}{bounds.describe()}"
    return None


def check_values(cls: type, values: Mapping[str, Any], prefix: str,
                 error: Callable[[str], Exception] = LowbitError) -> None:
    """Raise ``error(prefix + message)`` for the first value whose type or range does not fit its field
    of dataclass ``cls``; names the field, what it takes, the value and the default.  Names that are not
    init fields are left to the caller."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, value in values.items():
        f = fields.get(name) if isinstance(name, str) else None
        if f is None:
            continue
        problem = _problem(f, hints.get(name, Any), value)
        if problem is not None:
            default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
            raise error(f"{prefix}{problem}, got {_show(value)}{default}")


def check_fields(obj: Any, prefix: str, error: Callable[[str], Exception] = LowbitError) -> None:
    """:func:`check_values` on the init fields of the dataclass instance ``obj`` (call it first in
    ``__post_init__``)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    check_values(type(obj), values, prefix, error)
