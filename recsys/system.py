"""Process measurements shared by training, scoring and benchmarks."""

from __future__ import annotations

import resource
from pathlib import Path


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
