"""Random CTR samples at a chosen vocabulary size, for throughput benchmarks at Taobao scale.

The click-log generator (:mod:`recsys.data.synthetic`) sizes its vocabulary by the items its users touch,
so it cannot give a 4-million-item table without billions of events. This source writes CTR samples
directly, in the documented schema, with ``num_items`` as the vocabulary:

* histories of ``min_len..max_len`` items (oldest first); item ids follow a power law
  (``id = perm[floor(num_items * u**skew)]``, ``u`` uniform; ``skew = 1`` is uniform), so hot rows repeat
  within a batch as in real logs; an item's category is a fixed hash of its id;
* a share ``positive_rate`` of rows are positives whose target is an item of their own history (the signal
  target attention finds), the others negatives drawn from the same popularity;
* users uniform in ``1..num_users``; ``rows`` per split.

Deterministic for a seed and cached like every dataset (``data=scale``; ``configs/benchmark/dare_scale.yaml``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, write_dataset
from recsys.data.schema import SAMPLE_SCHEMA, SPLITS

log = logging.getLogger(__name__)


def _ids(rng: np.random.Generator, perm: np.ndarray, size: int, skew: float) -> np.ndarray:
    """``size`` item ids in ``1..len(perm)`` with power-law popularity."""
    rank = np.minimum((rng.random(size) ** skew * perm.size).astype(np.int64), perm.size - 1)
    return perm[rank] + 1


def category_of(items: np.ndarray, num_categories: int) -> np.ndarray:
    """Fixed item -> category map (a multiplicative hash), ids ``1..num_categories``."""
    return (items * 2654435761) % num_categories + 1


def _list_column(values: np.ndarray, offsets: np.ndarray) -> pl.Series:
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)))


def sample_split(
    rng: np.random.Generator,
    rows: int,
    perm: np.ndarray,
    num_users: int,
    num_categories: int,
    min_len: int,
    max_len: int,
    positive_rate: float,
    skew: float,
) -> pl.DataFrame:
    """One split of ``rows`` CTR samples (see the module docstring)."""
    lengths = rng.integers(min_len, max_len + 1, size=rows)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    hist_item = _ids(rng, perm, int(offsets[-1]), skew)
    label = (rng.random(rows) < positive_rate).astype(np.int8)
    own = hist_item[offsets[:-1] + (rng.random(rows) * lengths).astype(np.int64)]  # an item of the own history
    item = np.where(label == 1, own, _ids(rng, perm, rows, skew))
    frame = pl.DataFrame(
        {
            "user": rng.integers(1, num_users + 1, size=rows),
            "item": item,
            "category": category_of(item, num_categories),
            "label": label,
            "timestamp": np.arange(rows, dtype=np.int64),
        }
    )
    frame = frame.with_columns(
        _list_column(hist_item, offsets).alias("hist_item"),
        _list_column(category_of(hist_item, num_categories), offsets).alias("hist_cat"),
    )
    return frame.cast(dict(SAMPLE_SCHEMA))


def prepare_scale_samples(
    cache_root: str | Path,
    num_users: int = 987_994,
    num_items: int = 4_068_791,
    num_categories: int = 9_408,
    rows: Mapping[str, int] | None = None,
    min_len: int = 200,
    max_len: int = 200,
    positive_rate: float = 1 / 3,
    skew: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write (or reuse) the dataset ``scale`` and return its folder. Defaults: the Taobao UserBehavior
    vocabulary, full 200-long histories, one positive per two negatives."""
    rows = {**{"train": 1_048_576, "val": 20_480, "test": 20_480}, **dict(rows or {})}
    if not 1 <= min_len <= max_len or min(num_users, num_items, num_categories) < 1 or skew <= 0:
        raise ValueError(
            f"scale samples: need 1 <= min_len <= max_len, sizes >= 1 and skew > 0; got min_len={min_len}, "
            f"max_len={max_len}, num_users={num_users}, num_items={num_items}, skew={skew}"
        )
    params = dict(
        num_users=num_users,
        num_items=num_items,
        num_categories=num_categories,
        rows={s: int(rows[s]) for s in SPLITS},
        min_len=min_len,
        max_len=max_len,
        positive_rate=positive_rate,
        skew=skew,
        seed=seed,
    )
    fp = fingerprint("scale", params, [])
    hit = cached_dataset(Path(cache_root), "scale", fp)
    if hit is not None:
        return hit
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_items)
    splits = {
        split: sample_split(
            rng, params["rows"][split], perm, num_users, num_categories, min_len, max_len, positive_rate, skew
        )
        for split in SPLITS
    }
    meta = DatasetMeta(
        name="scale",
        fingerprint=fp,
        num_users=num_users,
        num_items=num_items,
        num_categories=num_categories,
        max_len=max_len,
        rows={k: v.height for k, v in splits.items()},
        params=params,
    )
    log.info("scale samples: writing %s", meta.rows)
    return write_dataset(Path(cache_root), meta, splits)
