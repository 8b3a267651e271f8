"""Hand freed heap memory back to the operating system between blocks.

glibc keeps freed chunks below its (adaptive) mmap threshold in the process heap, so a long
sequential run slowly inflates the resident set with memory it no longer uses; ``malloc_trim``
returns it.  A no-op where glibc is absent (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); otherwise do nothing."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
