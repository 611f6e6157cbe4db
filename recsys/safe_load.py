"""``torch.load`` for files that come from outside (checkpoints, bundle weights): tensors and primitives only
(``weights_only=True``), and a one-line reason when a file is refused.

torch's own message for a refused pickle spans several lines and suggests ``weights_only=False``, which is
exactly what must not be done with a file of unknown origin; :func:`describe` keeps the one line that says
what the file named.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch


class UnreadableTensorFile(Exception):
    """``torch.load(..., weights_only=True)`` refused or could not parse a file; the message is one line."""


def describe(err: BaseException) -> str:
    """One line: why ``torch.load(..., weights_only=True)`` failed."""
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        detail = next((line.strip() for line in after.splitlines() if line.strip()), "unsupported content")
        detail = detail.split(". Please use", 1)[0]  # drop torch's advice on how to allow the global anyway
        return f"it holds objects other than tensors, refused by weights_only=True ({detail})"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def load_tensors(source: str | Path | IO[bytes]) -> Any:
    """``torch.load(source, map_location="cpu", weights_only=True)``; :class:`UnreadableTensorFile` (one line,
    caused by torch's error) when the file is truncated, not a torch file, or holds other objects."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnreadableTensorFile(describe(err)) from err


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Any]) -> str | None:
    """None when ``found`` (name -> tensor) has exactly the names and shapes of ``expected`` (name -> shape), else
    one line: ``N missing, N unexpected, N differently shaped tensors; e.g. [...]``."""
    shapes = {k: tuple(v.shape) for k, v in found.items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    other = sorted(k for k in set(expected) & set(shapes) if tuple(expected[k]) != shapes[k])
    if not (missing or unexpected or other):
        return None
    return (
        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(other)} differently shaped tensors; "
        f"e.g. {(missing + unexpected + other)[:3]}"
    )
