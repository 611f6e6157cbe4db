"""The two parquet schemas every data path in the package speaks.

1. **Interaction log** (what converters read from raw data, what the synthetic generator writes):

   ==========  =======  ==============================================================
   column      dtype    meaning
   ==========  =======  ==============================================================
   user        Int64    raw or remapped user id
   item        Int64    item id
   category    Int64    item category id
   behavior    String   behaviour type (``pv``, ``cart``, ``fav``, ``buy``, ``rating``)
   timestamp   Int64    Unix seconds
   ==========  =======  ==============================================================

2. **CTR samples** (one row per (user, target) pair, what training and scoring read):

   ==========  ===========  ==========================================================
   column      dtype        meaning
   ==========  ===========  ==========================================================
   user        Int64        user id, remapped to 1..num_users
   item        Int64        target item id, 1..num_items (0 is the padding row)
   category    Int64        target category id, 1..num_categories
   label       Int8         1 = positive (clicked), 0 = sampled negative
   timestamp   Int64        time of the target event (negatives reuse the positive's)
   hist_item   List(Int64)  behaviour history before the target, oldest first, <= max_len
   hist_cat    List(Int64)  categories of ``hist_item``, same lengths
   ==========  ===========  ==========================================================

   Extra columns (for example ``rating`` in MovieLens, used as a second task label) may follow.
   Histories are *jagged*: no padding is stored; models pad per batch.

Every check raises :class:`DataValidationError` with a message naming the file and the column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import polars as pl

from recsys.data.vocab import Vocab  # noqa: F401  (re-exported: polars-free home)
from recsys.errors import DataValidationError  # noqa: F401  (re-exported)

LOG_SCHEMA: Mapping[str, pl.DataType] = {
    "user": pl.Int64(),
    "item": pl.Int64(),
    "category": pl.Int64(),
    "behavior": pl.String(),
    "timestamp": pl.Int64(),
}

SAMPLE_SCHEMA: Mapping[str, pl.DataType] = {
    "user": pl.Int64(),
    "item": pl.Int64(),
    "category": pl.Int64(),
    "label": pl.Int8(),
    "timestamp": pl.Int64(),
    "hist_item": pl.List(pl.Int64()),
    "hist_cat": pl.List(pl.Int64()),
}

ID_COLUMNS = ("user", "item", "category")
HISTORY_COLUMNS = ("hist_item", "hist_cat")
SPLITS = ("train", "val", "test")


def _is_integer(dtype: pl.DataType) -> bool:
    return dtype.is_integer()


def check_columns(schema: Mapping[str, pl.DataType], required: Iterable[str], source: str) -> None:
    """Raise if a required column is missing; ``source`` names the file in the message."""
    missing = [c for c in required if c not in schema]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {missing}; found {list(schema)}. "
            f"See recsys/data/schema.py for the documented schema."
        )


def check_sample_dtypes(
    schema: Mapping[str, pl.DataType], source: str, columns: Sequence[str] = tuple(SAMPLE_SCHEMA)
) -> None:
    """Ids and labels must be integers, histories lists of integers."""
    for col in columns:
        dtype = schema[col]
        if col in HISTORY_COLUMNS:
            ok = isinstance(dtype, (pl.List, pl.Array)) and _is_integer(dtype.inner)  # type: ignore[union-attr]
            want = "List(Int64)"
        else:
            ok = _is_integer(dtype)
            want = "an integer type"
        if not ok:
            raise DataValidationError(f"{source}: column '{col}' has dtype {dtype}, expected {want}.")


def validate_samples(
    frame: pl.DataFrame,
    source: str,
    vocab: Vocab | None = None,
    label_columns: Sequence[str] = ("label",),
    allow_empty_history: bool = False,
) -> None:
    """Full check of a CTR-sample frame before it reaches a model.

    Checks columns, dtypes, nulls, empty or mismatched histories, labels in {0, 1}
    and ids within ``vocab`` (when given). Raises :class:`DataValidationError`.
    """
    required = list(SAMPLE_SCHEMA) + [c for c in label_columns if c not in SAMPLE_SCHEMA]
    check_columns(frame.schema, required, source)
    check_sample_dtypes(frame.schema, source)
    if frame.height == 0:
        raise DataValidationError(f"{source}: the table has no rows.")
    nulls = {c: n for c, n in zip(frame.columns, frame.null_count().row(0)) if c in required and n}
    if nulls:
        raise DataValidationError(f"{source}: null values in column(s) {nulls}.")
    check_no_null_inside(frame, HISTORY_COLUMNS, source)
    lengths = frame.select(pl.col("hist_item").list.len().alias("li"), pl.col("hist_cat").list.len().alias("lc"))
    if not allow_empty_history:
        empty = int((lengths["li"] == 0).sum())
        if empty:
            raise DataValidationError(
                f"{source}: column 'hist_item' has {empty} empty histories; every sample needs "
                f"at least one prior behaviour."
            )
    mismatched = int((lengths["li"] != lengths["lc"]).sum())
    if mismatched:
        raise DataValidationError(
            f"{source}: columns 'hist_item' and 'hist_cat' differ in length on {mismatched} rows."
        )
    for col in label_columns:
        bad = int((~frame[col].is_in([0, 1])).sum())
        if bad:
            raise DataValidationError(f"{source}: column '{col}' must hold only 0 or 1; {bad} rows do not.")
    if vocab is not None:
        check_id_ranges(frame, source, vocab)


def null_inside(column: str) -> pl.Expr:
    """Per row: whether the list column holds a null element (False for a null or empty list)."""
    return pl.col(column).list.eval(pl.element().is_null()).list.any().fill_null(False)


def check_no_null_inside(frame: pl.DataFrame, columns: Sequence[str], source: str) -> None:
    """A null id inside a history list is bad input (not an unseen id): name the column and the first row."""
    for column in columns:
        rows = frame.select(pl.arg_where(null_inside(column))).to_series()
        if len(rows):
            raise DataValidationError(
                f"{source}: column '{column}' holds null ids inside {len(rows)} histories (first at row {rows[0]}); "
                f"null ids are not allowed."
            )


def check_id_ranges(frame: pl.DataFrame, source: str, vocab: Vocab) -> None:
    """Every id must lie in [0, limit] (targets in [1, limit]); names the first offending column."""
    stats = frame.select(
        *[pl.col(c).min().alias(f"{c}_min") for c in ID_COLUMNS],
        *[pl.col(c).max().alias(f"{c}_max") for c in ID_COLUMNS],
        *[pl.col(c).list.min().min().alias(f"{c}_min") for c in HISTORY_COLUMNS],
        *[pl.col(c).list.max().max().alias(f"{c}_max") for c in HISTORY_COLUMNS],
    ).row(0, named=True)
    for col in ID_COLUMNS + HISTORY_COLUMNS:
        lo, hi, limit = stats[f"{col}_min"], stats[f"{col}_max"], vocab.limit(col)
        floor = 0 if col in HISTORY_COLUMNS else 1
        if lo is None:
            continue
        if lo < floor or hi > limit:
            raise DataValidationError(
                f"{source}: column '{col}' has ids in [{lo}, {hi}], outside the valid range "
                f"[{floor}, {limit}] of this dataset's vocabulary."
            )
