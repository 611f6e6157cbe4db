"""The DARE CTR-sample protocol, generic over any interaction log in ``LOG_SCHEMA``.

Follows thuml/DARE ``preprocess/taobao_v4.py`` (the reference code's Taobao preprocessing), step by step:

* keep only the protocol's behaviours; per user, order rows by time (stable: file order breaks ties);
* drop users with fewer than ``min_interactions`` rows;
* with a user sequence of length T (1-indexed, oldest first), ``targets="dare"`` makes train targets
  at T-2, T-7, ... (``num_train_targets`` of them, stride ``train_stride``), val at T-1, test at T;
  ``targets="all"`` makes every position p > ``min_history`` a target (last -> test, second to last
  -> val, the rest -> train);
* the history of a target at p is the up to ``max_len`` behaviours before p, oldest first (jagged;
  targets at p = 1 have no history and are skipped);
* ``negatives`` negatives per positive, item drawn with probability proportional to its frequency in
  the (behaviour-filtered) log, redrawn while the user has that item anywhere in the log; a negative
  reuses the positive's user, timestamp and history, and takes the item's last-seen category.

Everything is vectorised: polars for filtering, per-user positions and ordering; numpy for bulk
sampling and for cutting every history window out of the sorted log in one gather.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from recsys.data.schema import (
    LOG_SCHEMA,
    SAMPLE_SCHEMA,
    SPLITS,
    DataValidationError,
    Vocab,
    check_columns,
    validate_samples,
)
from recsys.errors import ConfigError

_MAX_REDRAW_ROUNDS = 10_000


@dataclass(frozen=True)
class CTRProtocol:
    """Parameters of the sample builder; the defaults are DARE's Taobao protocol."""

    behaviors: tuple[str, ...] = ("pv",)
    min_interactions: int = 210
    num_train_targets: int = 19
    train_stride: int = 5
    max_len: int = 200
    negatives: int = 2
    seed: int = 0
    targets: Literal["dare", "all"] = "dare"
    min_history: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "behaviors", tuple(self.behaviors))
        if self.targets not in ("dare", "all"):
            raise ConfigError(f"CTRProtocol.targets must be 'dare' or 'all', got {self.targets!r}.")
        for name in ("num_train_targets", "train_stride", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CTRProtocol.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("min_interactions", "negatives", "min_history"):
            if getattr(self, name) < 0:
                raise ConfigError(f"CTRProtocol.{name} must be >= 0, got {getattr(self, name)}.")
        if not self.behaviors:
            raise ConfigError("CTRProtocol.behaviors must name at least one behaviour.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (behaviours as a list)."""
        data = asdict(self)
        data["behaviors"] = list(self.behaviors)
        return data

    @classmethod
    def coerce(cls, value: CTRProtocol | Mapping[str, Any] | None) -> CTRProtocol:
        """Accept a protocol, a mapping of its fields (e.g. a Hydra config) or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**dict(value))


# ----------------------------------------------------------------------------------------------
# log preparation


def check_log(log: pl.DataFrame, source: str, extra_columns: Sequence[str] = ()) -> pl.DataFrame:
    """Check the log's columns and nulls, and cast them to ``LOG_SCHEMA`` dtypes."""
    required = list(LOG_SCHEMA) + list(extra_columns)
    check_columns(log.schema, required, source)
    nulls = {c: n for c, n in zip(required, log.select(required).null_count().row(0)) if n}
    if nulls:
        raise DataValidationError(f"{source}: null values in column(s) {nulls}.")
    try:
        return log.with_columns(pl.col(c).cast(t) for c, t in LOG_SCHEMA.items())
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(f"{source}: cannot cast the log to LOG_SCHEMA ({err}).") from err


def filter_behaviors(log: pl.DataFrame, behaviors: Sequence[str]) -> pl.DataFrame:
    """Keep only rows whose ``behavior`` is one of ``behaviors`` (order preserved)."""
    return log.filter(pl.col("behavior").is_in(list(behaviors)))


def sort_log(log: pl.DataFrame) -> pl.DataFrame:
    """Stable sort by (user, timestamp): rows with equal keys keep their log order."""
    return log.sort(["user", "timestamp"], maintain_order=True)


def _first_appearance_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Map values to 1..n in order of first appearance; returns (codes, n)."""
    uniques, first_index, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(1, len(uniques) + 1, dtype=np.int64)
    return rank[inverse.reshape(-1)], len(uniques)


def remap_ids(log: pl.DataFrame) -> tuple[pl.DataFrame, Vocab, dict[str, pl.DataFrame]]:
    """Remap user/item/category to 1..n by first appearance in log order (0 stays free for padding).

    Returns the remapped log (same row order), the id-space sizes and the id maps
    (column -> frame ``raw: Int64, id: Int64`` sorted by ``id``), which the cache stores so scoring
    jobs can map raw ids of new logs. Filter behaviours *before* calling this if the vocabulary
    should cover only the kept behaviours (DARE does).
    """
    check_columns(log.schema, ("user", "item", "category"), "remap_ids(log)")
    sizes, columns, maps = {}, [], {}
    for name in ("user", "item", "category"):
        raw = log[name].to_numpy()
        codes, sizes[name] = _first_appearance_codes(raw)
        columns.append(pl.Series(name, codes, dtype=pl.Int64))
        maps[name] = (
            pl.DataFrame({"raw": raw, "id": codes}, schema={"raw": pl.Int64, "id": pl.Int64})
            .unique("id", keep="first", maintain_order=True)
            .sort("id")
        )
    return log.with_columns(columns), Vocab(sizes["user"], sizes["item"], sizes["category"]), maps


# ----------------------------------------------------------------------------------------------
# targets and histories


def _with_positions(log: pl.DataFrame) -> pl.DataFrame:
    """Add ``_pos`` (1-indexed position in the user's sequence) and ``_len`` (T). Log must be sorted."""
    return log.with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("user").alias("_pos"),
        pl.len().over("user").cast(pl.Int64).alias("_len"),
    )


def _split_expr(protocol: CTRProtocol) -> pl.Expr:
    """Expression giving each row's split name (null for rows that are not targets)."""
    back = pl.col("_len") - pl.col("_pos")  # 0 = last behaviour
    if protocol.targets == "dare":
        k = back - 2
        is_train = (
            (k >= 0) & (k % protocol.train_stride == 0) & (k // protocol.train_stride < protocol.num_train_targets)
        )
        eligible = pl.col("_pos") >= 2
    else:
        is_train = back >= 2
        eligible = (pl.col("_pos") > protocol.min_history) & (pl.col("_pos") >= 2)
    return (
        pl.when(~eligible)
        .then(None)
        .when(back == 0)
        .then(pl.lit("test"))
        .when(back == 1)
        .then(pl.lit("val"))
        .when(is_train)
        .then(pl.lit("train"))
        .otherwise(None)
        .alias("_split")
    )


def select_targets(log: pl.DataFrame, protocol: CTRProtocol) -> pl.DataFrame:
    """Positive target rows of ``log`` (sorted, with ``_pos``/``_len``) plus a ``_split`` column."""
    return log.with_columns(_split_expr(protocol)).filter(pl.col("_split").is_not_null())


def _window_index(ends: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat indices) of the jagged windows ``[ends[r] - lengths[r], ends[r])``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # cumulative sum of unit steps, with a jump at each window's first slot (faster than np.repeat)
    live = lengths > 0
    starts, last = (ends - lengths)[live], (ends - 1)[live]
    steps = np.ones(offsets[-1], dtype=np.int64)
    if len(starts):
        jumps = np.empty(len(starts), dtype=np.int64)
        jumps[0], jumps[1:] = starts[0], starts[1:] - last[:-1]
        steps[offsets[:-1][live]] = jumps
    return offsets, np.cumsum(steps, out=steps)


def _list_series(name: str, offsets: np.ndarray, values: np.ndarray) -> pl.Series:
    """A ``List(Int64)`` series from arrow-style offsets and flat values (no copy of the values)."""
    arrow = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))
    return pl.Series(name, pl.from_arrow(arrow)).cast(pl.List(pl.Int64))


def attach_histories(rows: pl.DataFrame, log: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Add ``hist_item``/``hist_cat``: the up to ``max_len`` behaviours before each row's target.

    ``log`` is the sorted log with ``_pos``; ``rows[_g]`` is the row index of each target in ``log``,
    so its history is the contiguous window ``log[_g - n : _g]`` with n = min(_pos - 1, max_len).
    Histories are cut out in one bulk gather, straight into the output row order.
    """
    ends = rows["_g"].to_numpy().astype(np.int64)
    lengths = np.minimum(rows["_pos"].to_numpy() - 1, max_len).astype(np.int64)
    offsets, index = _window_index(ends, lengths)
    return rows.with_columns(
        _list_series("hist_item", offsets, log["item"].to_numpy()[index]),
        _list_series("hist_cat", offsets, log["category"].to_numpy()[index]),
    )


# ----------------------------------------------------------------------------------------------
# negatives


@dataclass(frozen=True)
class ItemSampler:
    """Frequency-proportional item sampler with per-user rejection of interacted items."""

    items: np.ndarray  # sorted unique item ids
    categories: np.ndarray  # last-seen category of each item
    cdf: np.ndarray  # cumulative frequency, float64
    users: np.ndarray  # sorted unique user ids of the log
    forbidden: np.ndarray  # sorted keys user_code * n_items + item_code

    @classmethod
    def from_log(cls, log: pl.DataFrame) -> ItemSampler:
        """Build from a time-sorted, behaviour-filtered log (frequencies over the whole log)."""
        table = log.group_by("item").agg(pl.len().alias("n"), pl.col("category").last()).sort("item")
        items = table["item"].to_numpy()
        users = np.unique(log["user"].to_numpy())
        u = np.searchsorted(users, log["user"].to_numpy())
        i = np.searchsorted(items, log["item"].to_numpy())
        forbidden = np.unique(u.astype(np.int64) * len(items) + i)
        cdf = np.cumsum(table["n"].to_numpy().astype(np.float64))
        return cls(items, table["category"].to_numpy(), cdf, users, forbidden)

    def _is_forbidden(self, user_codes: np.ndarray, item_codes: np.ndarray) -> np.ndarray:
        keys = user_codes * len(self.items) + item_codes
        at = np.minimum(np.searchsorted(self.forbidden, keys), len(self.forbidden) - 1)
        return self.forbidden[at] == keys

    def _draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        codes = np.searchsorted(self.cdf, rng.random(size) * self.cdf[-1], side="right")
        return np.minimum(codes, len(self.items) - 1)

    def _check_feasible(self, user_codes: np.ndarray) -> None:
        seen = np.bincount(self.forbidden // len(self.items), minlength=len(self.users))
        full = np.unique(user_codes[seen[user_codes] >= len(self.items)])
        if len(full):
            raise DataValidationError(
                f"negative sampling: user(s) {self.users[full][:5].tolist()} interacted with every "
                f"item of the log; no negative can be drawn."
            )

    def sample(self, users: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One negative per entry of ``users``: returns (item ids, their last-seen categories)."""
        user_codes = np.searchsorted(self.users, users).astype(np.int64)
        self._check_feasible(user_codes)
        codes = self._draw(rng, len(users))
        todo = np.flatnonzero(self._is_forbidden(user_codes, codes))
        for _ in range(_MAX_REDRAW_ROUNDS):
            if len(todo) == 0:
                break
            codes[todo] = self._draw(rng, len(todo))
            todo = todo[self._is_forbidden(user_codes[todo], codes[todo])]
        else:
            raise DataValidationError(
                f"negative sampling: {len(todo)} draws still rejected after {_MAX_REDRAW_ROUNDS} rounds."
            )
        return self.items[codes], self.categories[codes]


def add_negatives(
    positives: pl.DataFrame,
    sampler: ItemSampler,
    negatives: int,
    seed: int,
    extra_columns: Sequence[str] = (),
) -> pl.DataFrame:
    """Append ``negatives`` sampled rows per positive (label 0, extras 0) and return all rows."""
    positives = positives.with_columns(pl.lit(1, dtype=pl.Int8).alias("label"))
    if negatives == 0:
        return positives
    rng = np.random.default_rng(seed)
    repeat = np.repeat(np.arange(positives.height), negatives)
    items, cats = sampler.sample(positives["user"].to_numpy()[repeat], rng)
    negs = positives[repeat].with_columns(
        pl.Series("item", items, dtype=pl.Int64),
        pl.Series("category", cats, dtype=pl.Int64),
        pl.lit(0, dtype=pl.Int8).alias("label"),
        *[pl.lit(0).cast(positives.schema[c]).alias(c) for c in extra_columns],
    )
    return pl.concat([positives, negs], how="vertical")


# ----------------------------------------------------------------------------------------------
# the builder


def _ordered(rows: pl.DataFrame) -> pl.DataFrame:
    """Deterministic order (user, timestamp, label desc, item; then the target's position)."""
    return rows.sort(
        ["user", "timestamp", "label", "item", "_pos"],
        descending=[False, False, True, False, False],
        maintain_order=True,
    )


def _finalise(rows: pl.DataFrame, log: pl.DataFrame, max_len: int, extra_columns: Sequence[str]) -> pl.DataFrame:
    """Order one split's rows, attach histories and cast to exactly ``SAMPLE_SCHEMA`` (+ extras)."""
    frame = attach_histories(_ordered(rows), log, max_len)
    return frame.select(*[pl.col(c).cast(t) for c, t in SAMPLE_SCHEMA.items()], *[pl.col(c) for c in extra_columns])


def _log_vocab(log: pl.DataFrame) -> Vocab:
    """Largest ids in the log, used to range-check the samples."""
    row = log.select(pl.col("user").max(), pl.col("item").max(), pl.col("category").max()).row(0)
    return Vocab(*(int(v) for v in row))


def build_ctr_samples(
    log: pl.DataFrame,
    protocol: CTRProtocol | None = None,
    extra_columns: Sequence[str] = (),
    vocab: Vocab | None = None,
    source: str = "log",
) -> dict[str, pl.DataFrame]:
    """Build validated train/val/test CTR samples from an interaction log (see module docstring).

    ``extra_columns`` of the log are passed through for positives and set to 0 for negatives.
    ``vocab`` (default: the log's largest ids) is used to range-check the output.
    Same log and protocol (seed included) give identical frames.
    """
    protocol = CTRProtocol.coerce(protocol)
    log = check_log(log, source, extra_columns)
    log = sort_log(filter_behaviors(log, protocol.behaviors))
    if log.height == 0:
        raise DataValidationError(f"{source}: no rows with behavior in {list(protocol.behaviors)}.")
    sampler = ItemSampler.from_log(log)
    kept = _with_positions(log).filter(pl.col("_len") >= protocol.min_interactions).with_row_index("_g")
    if kept.height == 0:
        raise DataValidationError(
            f"{source}: no user has >= {protocol.min_interactions} '{'/'.join(protocol.behaviors)}' rows."
        )
    targets = select_targets(kept, protocol).select(
        "user", "item", "category", "timestamp", "_pos", "_g", "_split", *extra_columns
    )
    rows = add_negatives(targets, sampler, protocol.negatives, protocol.seed, extra_columns)
    vocab = vocab or _log_vocab(log)
    splits = {}
    for split in SPLITS:
        frame = _finalise(rows.filter(pl.col("_split") == split), kept, protocol.max_len, extra_columns)
        validate_samples(frame, f"{source} [{split}]", vocab)
        splits[split] = frame
    return splits
