"""Taobao UserBehavior (Tianchi dataset 649) -> DARE CTR samples.

The raw file is a headerless CSV ``user_id,item_id,category_id,behavior_type,timestamp``, grouped
by user and time-ordered within each user. The full file is the Tianchi UserBehavior dataset (about 100 M
rows); a 5,000-row head suffices for pipeline checks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, write_dataset
from recsys.data.protocol import CTRProtocol, build_ctr_samples, filter_behaviors, remap_ids
from recsys.data.schema import LOG_SCHEMA, DataValidationError
from recsys.errors import InputNotFound

log = logging.getLogger(__name__)

#: 2017-11-25 00:00:00 to 2017-12-03 23:59:59 (UTC+8), the dataset's official 9-day window.
TAOBAO_TIME_WINDOW: tuple[int, int] = (1511539200, 1512316799)
_RAW_COLUMNS = ("user", "item", "category", "behavior", "timestamp")


def _require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise InputNotFound naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: Taobao UserBehavior.csv not found; set data.path=<path to UserBehavior.csv>.")
    return path


def scan_taobao_log(path: Path, time_window: tuple[int, int] | None = TAOBAO_TIME_WINDOW) -> pl.LazyFrame:
    """Lazy scan of the raw CSV in file order, optionally restricted to ``time_window`` (inclusive)."""
    frame = pl.scan_csv(
        _require_file(path),
        has_header=False,
        schema=dict(zip(_RAW_COLUMNS, LOG_SCHEMA.values())),
        row_index_name="_row",
    )
    if time_window is not None:
        lo, hi = time_window
        frame = frame.filter(pl.col("timestamp").is_between(lo, hi, closed="both"))
    return frame.sort("_row").drop("_row")


def read_taobao_log(path: str | Path, time_window: tuple[int, int] | None = TAOBAO_TIME_WINDOW) -> pl.DataFrame:
    """Read the raw Taobao CSV into ``LOG_SCHEMA`` (raw ids, file order kept).

    ``time_window=None`` keeps every row; the default drops the few rows outside the official window.
    Raises InputNotFound (missing file) or DataValidationError (malformed rows), naming the file.
    """
    try:
        return scan_taobao_log(Path(path), time_window).collect()
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(
            f"{path}: cannot parse as headerless CSV with columns {list(_RAW_COLUMNS)} ({err})."
        ) from err


def prepare_taobao(
    path: str | Path,
    cache_root: str | Path,
    protocol: CTRProtocol | Mapping[str, Any] | None = None,
    time_window: tuple[int, int] | None = TAOBAO_TIME_WINDOW,
) -> Path:
    """Read -> keep protocol behaviours -> remap ids -> build samples -> cache (name ``taobao``).

    Ids are remapped over the behaviour-filtered log of *all* users (like DARE), so negatives can be
    items only seen by users below ``min_interactions``. Returns the cached dataset folder.
    """
    protocol = CTRProtocol.coerce(protocol)
    path = _require_file(Path(path))
    window = list(time_window) if time_window is not None else None
    params = {"protocol": protocol.to_dict(), "time_window": window}
    fp = fingerprint("taobao", params, [path])
    hit = cached_dataset(Path(cache_root), "taobao", fp)
    if hit is not None:
        log.info("taobao: reusing cached dataset %s", hit)
        return hit
    raw = filter_behaviors(read_taobao_log(path, time_window), protocol.behaviors)
    events, vocab, id_maps = remap_ids(raw)
    splits = build_ctr_samples(events, protocol, vocab=vocab, source=str(path))
    meta = DatasetMeta(
        name="taobao",
        fingerprint=fp,
        num_users=vocab.num_users,
        num_items=vocab.num_items,
        num_categories=vocab.num_categories,
        max_len=protocol.max_len,
        rows={k: v.height for k, v in splits.items()},
        params=params,
        extra_columns=[],
    )
    return write_dataset(Path(cache_root), meta, splits, id_maps)
