"""Bounded reading of user input: UTF-8 text files under a size cap, and YAML without alias bombs,
deep nesting or duplicate keys.  Every YAML lowbit reads from a user (recipe files, ``--option``
values) goes through :func:`load_yaml`; every error is a one-line LowbitError naming the source,
and the line and column where the YAML parser has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError

MAX_YAML_BYTES = 1 << 20  # a recipe is a few hundred bytes; shipped ones are below 2 KB
MAX_YAML_DEPTH = 32  # a recipe nests 5 levels (recipe > methods > entry > spec > block)
MAX_YAML_NODES = 100_000  # values after alias expansion; KV level tables of an 80-layer model: ~3k
MERGE_TAG = "tag:yaml.org,2002:merge"


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _decode(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text; the error names the line and byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LowbitError(f"{source} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
                          f"(offset {exc.start}); it must be a UTF-8 text file") from None


def read_text(path: str | Path, max_bytes: int, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (at most ``max_bytes`` bytes); one-line errors naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # never more than the cap, whatever stat says
    except OSError as exc:
        raise LowbitError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise LowbitError(f"{what} {path} is larger than the {max_bytes / 2**20:g} MiB lowbit reads; "
                          "use a smaller file")
    return _decode(data, f"{what} {path}")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents that nest too deeply, expand (through aliases) to too
    many values, alias their own enclosing node, or repeat a mapping key."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise LowbitError(f"{self.source} nests deeper than {MAX_YAML_DEPTH} levels ({_where(mark)}); "
                              "flatten it (a recipe nests 5)")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias and id(node) not in self._sizes:
            raise LowbitError(f"{self.source}: the alias at {_where(mark)} refers to a node that contains it; "
                              "remove the recursive alias")
        if not alias:
            self._check_keys(node)
            self._sizes[id(node)] = 1 + sum(self._sizes[id(c)] for c in _children(node))
        if self._sizes[id(node)] > MAX_YAML_NODES:
            raise LowbitError(f"{self.source} expands to more than {MAX_YAML_NODES:,} values through its "
                              f"aliases ({_where(mark)}); write the values out instead of repeating aliases")
        return node

    def _check_keys(self, node: Any) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != MERGE_TAG:
                if (key.tag, key.value) in seen:
                    raise LowbitError(f"{self.source} repeats the key {key.value!r} at {_where(key.start_mark)}; "
                                      "give each key once")
                seen.add((key.tag, key.value))


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> LowbitError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if getattr(exc, "context", None):
        problem = f"{exc.context}, {problem}"  # type: ignore[attr-defined]
    if mark is None and getattr(exc, "position", None) is not None:  # reader errors: a character offset
        line = text.count("\n", 0, exc.position) + 1  # type: ignore[attr-defined]
        return LowbitError(f"{source} is not valid YAML: {problem} at line {line}")
    return LowbitError(f"{source} is not valid YAML: {problem}" + (f" at {_where(mark)}" if mark else ""))


def load_yaml(text: str, source: str) -> Any:
    """The Python value of the YAML ``text`` read from ``source`` (named in errors), within the caps."""
    if len(text) > MAX_YAML_BYTES:
        raise LowbitError(f"{source} is larger than the {MAX_YAML_BYTES / 2**20:g} MiB lowbit reads as YAML; "
                          "a recipe needs far less")
    loader = None
    try:
        loader = _BoundedLoader(text, source)  # the reader checks the characters here
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, source) from None
    except (ValueError, TypeError, OverflowError) as exc:  # constructors: e.g. a date 2024-13-45
        raise LowbitError(f"{source} is not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """:func:`load_yaml` of the file at ``path``, which must be UTF-8 text below the size cap."""
    return load_yaml(read_text(path, MAX_YAML_BYTES, what), f"{what} {path}")
