"""UCI Census-Income (KDD), official test file (99,762 rows), as tabular multi-task samples.

``census-income.test.gz``: headerless, ``", "``-separated, 42 fields (:data:`COLUMNS`, names as in
keras-mmoe / DeepCTR; the UCI Census-Income (KDD) test file). Labels: ``income`` = ``income_50k == "50000+."``,
``never_married`` = ``marital_stat == "Never married"``. ``instance_weight`` (a survey weight) and the two
label sources are not features; :data:`DENSE` are standardised numbers, the other 32 fields categorical.
The split is the fixed one in ``split_seed2026/{train,val,test}_idx.npy`` (0-based row numbers), so
results line up with the peer runs (79,810 / 9,976 / 9,976 rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.schema import SPLITS, DataValidationError
from recsys.data.tabular import encode_tabular, prepare_tabular
from recsys.errors import ConfigError, InputNotFound

COLUMNS = (
    "age",
    "class_worker",
    "det_ind_code",
    "det_occ_code",
    "education",
    "wage_per_hour",
    "hs_college",
    "marital_stat",
    "major_ind_code",
    "major_occ_code",
    "race",
    "hisp_origin",
    "sex",
    "union_member",
    "unemp_reason",
    "full_or_part_emp",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "tax_filer_stat",
    "region_prev_res",
    "state_prev_res",
    "det_hh_fam_stat",
    "det_hh_summ",
    "instance_weight",
    "mig_chg_msa",
    "mig_chg_reg",
    "mig_move_reg",
    "mig_same",
    "mig_prev_sunbelt",
    "num_emp",
    "fam_under_18",
    "country_father",
    "country_mother",
    "country_self",
    "citizenship",
    "own_or_self",
    "vet_question",
    "vet_benefits",
    "weeks_worked",
    "year",
    "income_50k",
)
DENSE = ("age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked")
NOT_FEATURES = ("instance_weight", "income_50k", "marital_stat")
LABELS = {
    "income": (pl.col("income_50k") == "50000+.").cast(pl.Int8),
    "never_married": (pl.col("marital_stat") == "Never married").cast(pl.Int8),
}


def read_census(path: str | Path) -> pl.DataFrame:
    """The raw file as 42 stripped string columns named :data:`COLUMNS`."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: not found; set data.path=<census-income.test.gz of Census-Income (KDD)>.")
    try:
        frame = pl.read_csv(path, has_header=False, separator=",", infer_schema=False, quote_char=None)
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(f"{path}: cannot read as a headerless ', '-separated file ({err}).") from err
    if frame.width != len(COLUMNS):
        raise DataValidationError(f"{path}: expected {len(COLUMNS)} fields per row, found {frame.width}.")
    frame.columns = list(COLUMNS)
    return frame.with_columns(pl.all().str.strip_chars())


def read_split(split_dir: str | Path, num_rows: int) -> dict[str, np.ndarray]:
    """``{train,val,test}_idx.npy`` -> row numbers; they must be disjoint and within ``[0, num_rows)``."""
    split_dir = Path(split_dir)
    parts = {}
    for split in SPLITS:
        file = split_dir / f"{split}_idx.npy"
        if not file.is_file():
            raise InputNotFound(
                f"{file}: not found; set data.source.split_dir=<folder with {{train,val,test}}_idx.npy>."
            )
        rows = np.load(file, allow_pickle=False).astype(np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= num_rows)):
            raise DataValidationError(f"{file}: row numbers must be a 1-d array within [0, {num_rows}).")
        parts[split] = rows
    joined = np.concatenate(list(parts.values()))
    if len(np.unique(joined)) != len(joined):
        raise DataValidationError(f"{split_dir}: the train/val/test row numbers overlap.")
    return parts


def prepare_census(
    path: str | Path,
    split_dir: str | Path,
    cache_root: str | Path,
    dense: Sequence[str] = DENSE,
    log_dense: Sequence[str] = (),
    dense_buckets: int = 0,
    dense_pwl: int = 0,
    name: str = "census",
) -> Path:
    """Read -> encode (vocabularies and scaling fitted on the train rows) -> cache ``<name>-<fp>``.

    ``log_dense``: dense columns put through ``log1p`` before scaling (the heavy-tailed money columns);
    ``dense_buckets``: also add each dense column as a categorical train-quantile bucket (0 = off);
    ``dense_pwl``: also add its piecewise-linear quantile encoding (0 = off);
    see :func:`recsys.data.tabular.encode_tabular`.
    """
    path, split_dir = Path(path), Path(split_dir)
    inputs = [path] + [split_dir / f"{s}_idx.npy" for s in SPLITS]
    for file in inputs:
        if not file.is_file():
            raise InputNotFound(
                f"{file}: not found; set data.path=<census-income.test.gz> and "
                f"data.source.split_dir=<its split_seed2026 folder>."
            )
    unknown = [c for c in dense if c not in COLUMNS or c in NOT_FEATURES]
    if unknown:
        raise ConfigError(f"census: dense column(s) {unknown} are not feature columns of {COLUMNS}")
    if not set(log_dense) <= set(dense):
        raise ConfigError(f"census: log_dense {list(log_dense)} must be a subset of dense {list(dense)}")
    params = {
        "dense": list(dense),
        "log_dense": list(log_dense),
        "dense_buckets": int(dense_buckets),
        "dense_pwl": int(dense_pwl),
        "not_features": list(NOT_FEATURES),
        "labels": list(LABELS),
    }

    def build() -> tuple[dict[str, pl.DataFrame], list]:
        frame = read_census(path)
        parts = read_split(split_dir, frame.height)
        categorical = [c for c in COLUMNS if c not in dense and c not in NOT_FEATURES]
        splits = encode_tabular(
            frame, parts, categorical, dense, LABELS, str(path), log_dense, dense_buckets, dense_pwl
        )
        return splits, list(LABELS)

    return prepare_tabular(name, Path(cache_root), params, inputs, build)
