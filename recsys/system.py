"""Process measurements shared by training, scoring and benchmarks."""

from __future__ import annotations

import ctypes
import resource
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def peak_rss_mb() -> float:
    """Peak resident set size of this process's address space so far, in MiB.

    Reads ``VmHWM`` from ``/proc/self/status``: unlike ``getrusage().ru_maxrss``, Linux resets it at
    ``exec``, so a subprocess does not inherit the high-water mark of the parent it was forked from.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def term_with_parent() -> None:
    """In a child process (Linux): SIGTERM when its parent dies, even by SIGKILL, so that no worker outlives
    the job that started it (``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pinned_peak_mb() -> float | None:
    """Peak bytes (MiB) of page-locked host memory that torch's caching host allocator held in this process
    (``torch.cuda.host_memory_stats``: blocks handed out plus cached), or ``None`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.host_memory_stats()
    peak = next((v for k, v in stats.items() if k.startswith("allocated_bytes") and k.endswith("peak")), None)
    return None if peak is None else round(peak / 2**20, 1)
