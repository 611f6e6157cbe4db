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
#: the dataset's behaviour types (page view, purchase, add to cart, favourite)
BEHAVIORS = ("pv", "buy", "cart", "fav")


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

    Every row must have its 5 fields and a known ``behavior_type`` (:data:`BEHAVIORS`); otherwise
    DataValidationError names the file and the lines (and says when the file looks cut off: a last line
    without its newline). ``time_window=None`` keeps every row; the default leaves out the few rows outside
    the official window, and logs how many. Raises InputNotFound for a missing file.
    """
    path = _require_file(Path(path))
    try:
        frame = scan_taobao_log(path, None).with_row_index("_line", offset=1).collect()
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(
            f"{path}: cannot parse as headerless CSV with columns {list(_RAW_COLUMNS)} ({err})."
        ) from err
    cut = _cut_note(path, frame.height)
    incomplete = frame.filter(pl.any_horizontal(pl.col(c).is_null() for c in _RAW_COLUMNS))["_line"]
    if len(incomplete):
        raise DataValidationError(
            f"{path}: line(s) {_lines(incomplete)} have missing fields; every line needs "
            f"{','.join(_RAW_COLUMNS)}{cut if incomplete[-1] == frame.height else ''}."
        )
    unknown = frame.filter(~pl.col("behavior").is_in(BEHAVIORS))
    if unknown.height:
        raise DataValidationError(
            f"{path}: line(s) {_lines(unknown['_line'])} have behavior_type {unknown['behavior'][0]!r}; "
            f"allowed: {list(BEHAVIORS)}{cut if unknown['_line'][-1] == frame.height else ''}."
        )
    if time_window is not None:
        lo, hi = time_window
        inside = pl.col("timestamp").is_between(lo, hi, closed="both")
        if cut and frame.height and not frame.tail(1).select(inside).item():
            raise DataValidationError(
                f"{path}: line {frame.height} has timestamp {frame['timestamp'][-1]}, outside [{lo}, {hi}]{cut}."
            )
        dropped = frame.height
        frame = frame.filter(inside)
        if dropped - frame.height:
            log.info("%s: left out %d rows outside the time window [%d, %d]", path, dropped - frame.height, lo, hi)
    return frame.drop("_line")


def _lines(lines: pl.Series, limit: int = 5) -> str:
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{lines.head(limit).to_list()}{more}"


def _cut_note(path: Path, lines: int) -> str:
    """A note for errors on the last line when the file does not end with a newline (a cut copy)."""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return ""
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return ""
    return f" (line {lines}, the last, has no newline at its end: the file looks cut off)"


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
    meta = DatasetMeta.for_splits("taobao", fp, vocab, protocol.max_len, splits, params)
    return write_dataset(Path(cache_root), meta, splits, id_maps)
