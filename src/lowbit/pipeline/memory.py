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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of at least ``threshold`` bytes by its own mapping, returned to the OS the moment it
    is freed (glibc otherwise raises the threshold as big blocks come and go and keeps them in the heap): what a
    run under a memory budget wants, at the cost of a page fault per new large tensor.  No-op without glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
