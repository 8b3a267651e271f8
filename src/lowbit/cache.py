"""Where lowbit keeps downloaded and converted artifacts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``override``, else ``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit`` (~/.cache/lowbit)."""
    if override:
        root = Path(override)
    elif os.environ.get("LOWBIT_CACHE"):
        root = Path(os.environ["LOWBIT_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "lowbit"
    return root.expanduser()
