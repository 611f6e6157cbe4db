"""Gathering evaluation outputs across ranks, so every rank computes (and logs) the global metric."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch.distributed as dist

from recsys.distributed.env import is_distributed


def merge_batches(parts: Sequence[dict[str, list[np.ndarray]]], identity: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Concatenate per-rank batch lists in rank order, dropping any batch whose ``identity`` arrays equal
    an earlier batch's (see :func:`gather_batches`)."""
    names = list(dict.fromkeys(name for part in parts for name in part))
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    seen = set()
    for part in parts:
        count = len(next(iter(part.values()))) if part else 0
        for b in range(count):
            digest = hashlib.sha1()
            for name in identity:
                digest.update(np.ascontiguousarray(part[name][b]).tobytes())
            key = digest.hexdigest()
            if key in seen:
                continue
            seen.add(key)
            for name in names:
                out[name].append(part[name][b])
    return out


def gather_batches(columns: dict[str, list[np.ndarray]], identity: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """All ranks' per-batch arrays, in rank order, with repeated batches dropped (collective).

    ``columns`` maps a name to one array per evaluated batch (all names have the same number of
    batches). Lightning's distributed sampler pads the eval batch list by repeating batches so every
    rank gets the same count; a batch whose ``identity`` arrays (e.g. user ids and labels, not the
    predictions) equal an earlier batch's is such a repeat and is dropped. Without a multi-rank
    process group the input is returned unchanged.
    """
    if not is_distributed():
        return columns
    gathered: list[dict[str, list[np.ndarray]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, dict(columns))
    return merge_batches(gathered, identity)
