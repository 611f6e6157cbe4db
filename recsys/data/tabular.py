"""Tabular multi-task samples: categorical id fields + dense features + label columns, one row per sample.

Layout of a prepared tabular dataset (written by :func:`write_tabular` through ``recsys.data.cache``):

==================  ========  ====================================================================
column              dtype     meaning
==================  ========  ====================================================================
categorical fields  Int64     ids 1..K of the values seen in the train rows; 0 = unseen or missing
dense features      Float32   standardised with the train rows' mean and (population) std
label columns       Int8/F32  listed in ``meta.json``'s ``extra_columns`` (0/1 for binary tasks)
==================  ========  ====================================================================

Features are every non-label column: integer columns are categorical, float columns dense.
:class:`TabularDataModule` serves :class:`TabularBatch` es (a KJT with one id per field and row).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.compat import KeyedJaggedTensor
from recsys.data.batch import TabularBatch
from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, write_dataset
from recsys.data.datamodule import CTRDataModule
from recsys.data.schema import SPLITS, DataValidationError

log = logging.getLogger(__name__)

#: Bump when :func:`encode_tabular`'s output changes for the same parameters (part of every fingerprint).
TABULAR_VERSION = "2"


# ---------------------------------------------------------------------------------------------- converting


def encode_tabular(
    frame: pl.DataFrame,
    parts: Mapping[str, np.ndarray],
    categorical: Sequence[str],
    dense: Sequence[str],
    labels: Mapping[str, pl.Expr],
    source: str,
    log_dense: Sequence[str] = (),
    dense_buckets: int = 0,
    dense_pwl: int = 0,
) -> dict[str, pl.DataFrame]:
    """Raw frame + row numbers per split -> encoded splits (columns: categorical, dense, labels).

    Categorical values (compared as strings) get ids 1..K in sorted order of the values in the
    ``train`` rows, 0 for values never seen there; dense columns (``log_dense`` ones through
    ``log1p`` first) are standardised with the train rows' mean and std (ddof 0; std 0 -> 1).
    ``dense_buckets > 0`` also adds every dense column as a categorical field ``<col>_bucket``: its
    train-quantile bucket (at most ``dense_buckets`` buckets, ids 1..K); ``dense_pwl > 0`` adds its
    piecewise-linear encoding over at most ``dense_pwl`` train-quantile bins as dense columns
    ``<col>_pwl<j>`` = ``clip((x - b_{j-1}) / (b_j - b_{j-1}), 0, 1)``. ``labels`` maps a label column
    name to a polars expression over the raw columns (e.g. ``pl.col("click") * pl.col("purchase")``).
    """
    missing = [c for c in list(categorical) + list(dense) if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{source}: missing column(s) {missing}; found {frame.columns}.")
    train = parts["train"]
    columns, pwl_columns, bucket_columns = [], [], []
    for col in categorical:
        values = frame[col].cast(pl.String).fill_null("")
        vocab = values.gather(train).unique().sort()
        ids = values.replace_strict(vocab, pl.int_range(1, len(vocab) + 1, eager=True), default=0)
        columns.append(ids.cast(pl.Int64).alias(col))
    for col in dense:
        try:
            values = frame[col].cast(pl.Float64, strict=True)
        except pl.exceptions.PolarsError as err:
            raise DataValidationError(f"{source}: dense column '{col}' is not numeric ({err}).") from err
        if values.null_count() or not np.isfinite(values.to_numpy()).all():
            raise DataValidationError(f"{source}: dense column '{col}' holds missing or non-finite values.")
        if col in log_dense:
            if values.min() < 0:
                raise DataValidationError(f"{source}: dense column '{col}' has negative values; cannot log1p it.")
            values = values.log1p()
        fit = values.gather(train)
        if dense_buckets > 0:
            edges = quantile_edges(fit.to_numpy(), dense_buckets)[1:-1]
            bucket = np.searchsorted(edges, values.to_numpy(), side="right") + 1
            bucket_columns.append(pl.Series(f"{col}_bucket", bucket, dtype=pl.Int64))
        if dense_pwl > 0:
            edges = quantile_edges(fit.to_numpy(), dense_pwl)
            x = values.to_numpy()[:, None]
            pwl = np.clip((x - edges[:-1]) / np.diff(edges), 0.0, 1.0).astype(np.float32)
            pwl_columns += [pl.Series(f"{col}_pwl{j + 1}", pwl[:, j]) for j in range(pwl.shape[1])]
        mean, std = float(fit.mean()), float(fit.std(ddof=0))
        columns.append(((values - mean) / (std if std > 0 else 1.0)).cast(pl.Float32).alias(col))
    try:
        label_frame = frame.select([expr.alias(name) for name, expr in labels.items()])
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(f"{source}: cannot derive label columns {list(labels)} ({err}).") from err
    encoded = pl.DataFrame(columns + pwl_columns + bucket_columns).hstack(label_frame)
    return {split: encoded[np.asarray(rows)] for split, rows in parts.items()}


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Sorted distinct bin edges (min and max included): the ``bins``-quantiles of ``values`` merged with
    those of the values other than the most frequent one, so zero-inflated columns still get bins."""
    grid = np.linspace(0, 1, bins + 1)
    uniq, counts = np.unique(values, return_counts=True)
    rest = values[values != uniq[np.argmax(counts)]]
    parts = [np.quantile(values, grid)] + ([np.quantile(rest, grid)] if rest.size else [])
    return np.unique(np.concatenate(parts + [values.min(keepdims=True), values.max(keepdims=True)]))


def write_tabular(
    cache_root: Path,
    name: str,
    fp: str,
    params: Mapping[str, Any],
    splits: Mapping[str, pl.DataFrame],
    labels: Sequence[str],
) -> Path:
    """Atomic, fingerprinted write of encoded splits; ``labels`` become ``meta.extra_columns``."""
    meta = DatasetMeta(
        name=name,
        fingerprint=fp,
        num_users=0,
        num_items=0,
        num_categories=0,
        max_len=0,
        rows={k: v.height for k, v in splits.items()},
        params=dict(params),
        extra_columns=list(labels),
    )
    return write_dataset(Path(cache_root), meta, splits)


def prepare_tabular(name: str, cache_root: Path, params: Mapping[str, Any], inputs: Sequence[Path], build) -> Path:
    """Reuse ``<cache_root>/<name>-<fp>`` or call ``build() -> (splits, label names)`` and write it."""
    params = {**params, "tabular_version": TABULAR_VERSION}
    fp = fingerprint(name, params, inputs)
    hit = cached_dataset(Path(cache_root), name, fp)
    if hit is not None:
        log.info("%s: reusing cached dataset %s", name, hit)
        return hit
    splits, labels = build()
    return write_tabular(Path(cache_root), name, fp, params, splits, labels)


def random_parts(n: int, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Seeded permutation of ``n`` rows cut into train/val/test by ``fractions`` (sorted row numbers)."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fractions[:-1]])
    return {s: np.sort(p) for s, p in zip(SPLITS, np.split(perm, cuts))}


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class TabularTable:
    """Arrays of one split: ``ids [N, C]`` int64 (field order ``keys``), ``dense [N, D]``, labels ``[N]``."""

    keys: list[str]
    ids: np.ndarray
    dense: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_frame(
        cls,
        frame: pl.DataFrame,
        source: str,
        categorical: Mapping[str, int],
        dense: Sequence[str],
        label_columns: Mapping[str, str],
        binary_labels: Sequence[str] = (),
    ) -> TabularTable:
        """Validate and convert; ``categorical`` maps field -> table rows (ids must be in ``[0, rows)``)."""
        missing = [c for c in [*categorical, *dense, *label_columns.values()] if c not in frame.columns]
        if missing:
            raise DataValidationError(f"{source}: missing column(s) {missing}; found {frame.columns}.")
        nulls = {c: n for c, n in zip(frame.columns, frame.null_count().row(0)) if n}
        if nulls:
            raise DataValidationError(f"{source}: null values in column(s) {nulls}.")
        keys = list(categorical)
        ids = frame.select(keys).to_numpy().astype(np.int64) if keys else np.zeros((frame.height, 0), np.int64)
        for j, key in enumerate(keys):
            lo, hi = int(ids[:, j].min()), int(ids[:, j].max())
            if lo < 0 or hi >= categorical[key]:
                raise DataValidationError(
                    f"{source}: column '{key}' has ids in [{lo}, {hi}], outside [0, {categorical[key] - 1}]."
                )
        values = (
            frame.select(list(dense)).to_numpy().astype(np.float32)
            if dense
            else np.zeros((frame.height, 0), np.float32)
        )
        if not np.isfinite(values).all():
            raise DataValidationError(f"{source}: dense columns hold non-finite values.")
        labels = {}
        for task, column in label_columns.items():
            y = frame[column].cast(pl.Float32).to_numpy()
            if not np.isfinite(y).all():
                raise DataValidationError(f"{source}: column '{column}' holds NaN or infinite labels.")
            if column in binary_labels and not np.isin(y, (0.0, 1.0)).all():
                raise DataValidationError(
                    f"{source}: column '{column}' (task '{task}', loss binary) must hold "
                    f"only 0 or 1; {int((~np.isin(y, (0.0, 1.0))).sum())} rows do not."
                )
            labels[task] = y
        return cls(keys, np.ascontiguousarray(ids), np.ascontiguousarray(values), labels)

    def batch(self, rows: np.ndarray) -> TabularBatch:
        """Rows -> :class:`TabularBatch` (field-major id values, one per row and field)."""
        rows = np.asarray(rows, dtype=np.int64)
        b, c = len(rows), len(self.keys)
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.ascontiguousarray(self.ids[rows].T).reshape(-1)),
            lengths=torch.ones(b * c, dtype=torch.int32),
            stride=b,
            length_per_key=[b] * c,
            offset_per_key=[b * j for j in range(c + 1)],
        )
        return TabularBatch(
            sparse=sparse,
            dense=torch.from_numpy(self.dense[rows]),
            labels={t: torch.from_numpy(v[rows]) for t, v in self.labels.items()},
        )


# ---------------------------------------------------------------------------------------------- data module


class TabularDataModule(CTRDataModule):
    """A prepared tabular dataset served as :class:`TabularBatch` es (same arguments as ``CTRDataModule``).

    ``backbone_inputs()`` gives ``categorical`` (field -> table rows) and ``dense`` (feature names),
    what :class:`recsys.models.fields.FieldsBackbone` takes. Task label columns are checked against the
    dataset's label columns as soon as it is prepared.
    """

    _features: dict[str, Any] | None = None

    def prepare(self) -> DatasetMeta:
        if self.meta is None:
            meta = super().prepare()
            known = list(meta.extra_columns)
            for task in self.tasks:
                if task.label not in known:
                    self.meta = None
                    raise DataValidationError(
                        f"data.tasks: task '{task.name}' reads label column '{task.label}', which dataset "
                        f"'{meta.name}' does not have ({self.dataset_dir}/meta.json lists label columns {known})."
                    )
            self._features = self._read_features(meta)
        return self.meta

    def _read_features(self, meta: DatasetMeta) -> dict[str, Any]:
        files = [self.dataset_dir / f"{s}.parquet" for s in SPLITS]
        schema = pl.read_parquet_schema(files[0])
        features = [c for c in schema if c not in meta.extra_columns]
        categorical = [c for c in features if schema[c].is_integer()]
        dense = [c for c in features if schema[c].is_float()]
        other = [c for c in features if c not in categorical and c not in dense]
        if other:
            raise DataValidationError(f"{files[0]}: feature column(s) {other} are neither integer ids nor floats.")
        maxima = (
            pl.scan_parquet(files).select([pl.col(c).max() for c in categorical]).collect().row(0)
            if categorical
            else ()
        )
        return {"categorical": {c: int(m) + 1 for c, m in zip(categorical, maxima)}, "dense": dense}

    def backbone_inputs(self) -> dict[str, Any]:
        """``{"categorical": {field: rows}, "dense": [names]}``."""
        self.prepare()
        return {"categorical": dict(self._features["categorical"]), "dense": list(self._features["dense"])}

    def read_split(self, file: Path, meta: DatasetMeta) -> TabularTable:
        labels = {t.name: t.label for t in self.tasks}
        binary = [t.label for t in self.tasks if t.loss == "binary"]
        try:
            frame = pl.read_parquet(file)
        except Exception as err:  # polars raises several types for corrupt files
            raise DataValidationError(f"{file}: cannot read parquet ({type(err).__name__}: {err})") from err
        return TabularTable.from_frame(
            frame, str(file), self._features["categorical"], self._features["dense"], labels, binary
        )
