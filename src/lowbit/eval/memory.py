"""Peak memory of the current process (CPU RSS) or device (CUDA allocator)."""

from __future__ import annotations

import resource
import sys

import torch


def _proc_status_mb(field: str) -> float | None:
    """``field`` (e.g. ``VmHWM``) of ``/proc/self/status`` in MiB; None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def current_anon_mb() -> float | None:
    """Anonymous resident memory of this process now (its heap and tensors, not mapped files), in MiB; the
    whole resident set where ``RssAnon`` is not reported."""
    anon = _proc_status_mb("RssAnon")
    return anon if anon is not None else current_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss`` is inherited from the parent across
    fork and exec, so a child started by a big process would report the parent's peak).
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (Linux ``VmRSS``; None elsewhere)."""
    return _proc_status_mb("VmRSS")


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, in MiB (None on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**2
    return None
