"""Name -> class registries (methods, transforms): registration and option-checked lookup."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from lowbit.errors import LowbitError

T = TypeVar("T")


def registrar(table: dict[str, Any]) -> Callable[[T], T]:
    """A class decorator that files each class under its non-empty ``name`` in ``table``."""
    def register(cls: T) -> T:
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} needs a non-empty name")  # type: ignore[attr-defined]
        table[name] = cls
        return cls
    return register


def lookup(table: dict[str, Any], kind: str, name: Any, options: Any) -> Any:
    """The class registered as ``name``; a clear error for an unknown name, options that are not a
    mapping, or an option it lacks (option values are checked by the class, see ``lowbit.fields``)."""
    if not isinstance(name, str) or name not in table:
        raise LowbitError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
    if not isinstance(options, dict):
        raise LowbitError(f"the options of {kind} {name!r} must be a mapping of option names to values, "
                          f"got {type(options).__name__}")
    cls = table[name]
    unknown = set(options) - set(cls.options())
    if unknown:
        raise LowbitError(f"{kind} {name!r} has no option(s) {', '.join(sorted(map(str, unknown)))}; its options "
                          f"are {', '.join(cls.options()) or 'none'}")
    return cls
