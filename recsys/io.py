"""Atomic file writes: a finished artefact appears whole or not at all."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to ``<path>.tmp``, fsync, then rename over ``path`` (atomic on POSIX filesystems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """JSON (sorted keys, indented) written atomically."""
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
