"""How the commands print: two aligned columns, and byte counts in binary units."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def print_table(rows: Sequence[tuple[str, Any]]) -> None:
    """Two aligned columns: name and value."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def fmt_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB (one decimal above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
