"""Loaders of the tiny public multi-task samples (Ali-CCP, AliExpress; in ``data.path``): format checks and
loader tests only, a few hundred rows cannot rank models. All write the tabular layout of :mod:`recsys.data.tabular`.

* Ali-CCP (``ali_ccp_sample/ali_ccp_{train,val,test}_sample.csv``): labels ``click``, ``purchase`` and
  ``ctcvr`` = click·purchase (the entire-space label ESMM's second task reads); 23 id fields, 8 dense ``D*``.
* AliExpress (``aliexpress_sample/aliexpress_{train,test}_sample.csv``): labels ``click``, ``conversion``,
  ``ctcvr``; ``categorical_1..16`` ids, ``numerical_1..63`` dense; ``search_id`` dropped; validation =
  a seeded 10% of the train file.
* ByteRec (``byterec_sample/byterec_sample.txt``, tab-separated, no header): labels ``finish``, ``like``;
  ids uid, user_city, item_id, author_id, item_city, channel, music_id, device; dense ``duration_time``;
  seeded 80/10/10 split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.schema import SPLITS, DataValidationError
from recsys.data.tabular import encode_tabular, prepare_tabular, random_parts
from recsys.errors import InputNotFound

BYTEREC_COLUMNS = (
    "uid",
    "user_city",
    "item_id",
    "author_id",
    "item_city",
    "channel",
    "finish",
    "like",
    "music_id",
    "device",
    "time",
    "duration_time",
)


def _read_csv(path: Path, required: Sequence[str], **kwargs) -> pl.DataFrame:
    if not path.is_file():
        raise InputNotFound(f"{path}: not found; set data.path=<the sample's folder>.")
    try:
        frame = pl.read_csv(path, infer_schema_length=None, **kwargs)
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(f"{path}: cannot read as CSV ({err}).") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{path}: missing column(s) {missing}; found {frame.columns}.")
    return frame


def _stack(frames: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """Concatenate per-split frames; row numbers of each split in the stacked frame."""
    parts, start = {}, 0
    for split, frame in frames.items():
        parts[split] = np.arange(start, start + frame.height)
        start += frame.height
    return pl.concat(list(frames.values()), how="vertical_relaxed"), parts


def _ctcvr(click: str, conversion: str) -> dict[str, pl.Expr]:
    return {
        click: pl.col(click).cast(pl.Int8),
        conversion: pl.col(conversion).cast(pl.Int8),
        "ctcvr": (pl.col(click) * pl.col(conversion)).cast(pl.Int8),
    }


def prepare_ali_ccp(path: str | Path, cache_root: str | Path, name: str = "ali_ccp") -> Path:
    """``path``: folder of ``ali_ccp_{train,val,test}_sample.csv``."""
    path = Path(path)
    files = {s: path / f"ali_ccp_{s}_sample.csv" for s in SPLITS}

    def build():
        frames = {s: _read_csv(f, ("click", "purchase")) for s, f in files.items()}
        frame, parts = _stack(frames)
        dense = [c for c in frame.columns if c.startswith("D")]
        categorical = [c for c in frame.columns if c not in dense and c not in ("click", "purchase")]
        labels = _ctcvr("click", "purchase")
        return encode_tabular(frame, parts, categorical, dense, labels, str(path)), list(labels)

    return prepare_tabular(name, Path(cache_root), {"format": "ali_ccp"}, list(files.values()), build)


def prepare_aliexpress(
    path: str | Path, cache_root: str | Path, val_fraction: float = 0.1, seed: int = 0, name: str = "aliexpress"
) -> Path:
    """``path``: folder of ``aliexpress_{train,test}_sample.csv``."""
    path = Path(path)
    files = {s: path / f"aliexpress_{s}_sample.csv" for s in ("train", "test")}

    def build():
        train = _read_csv(files["train"], ("click", "conversion"))
        test = _read_csv(files["test"], ("click", "conversion"))
        cut = random_parts(train.height, (1 - val_fraction, val_fraction, 0.0), seed)
        frame, parts = _stack({"train": train[cut["train"]], "val": train[cut["val"]], "test": test})
        categorical = [c for c in frame.columns if c.startswith("categorical_")]
        dense = [c for c in frame.columns if c.startswith("numerical_")]
        labels = _ctcvr("click", "conversion")
        return encode_tabular(frame, parts, categorical, dense, labels, str(path)), list(labels)

    params = {"format": "aliexpress", "val_fraction": val_fraction, "seed": seed}
    return prepare_tabular(name, Path(cache_root), params, list(files.values()), build)


def prepare_byterec(
    path: str | Path,
    cache_root: str | Path,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    name: str = "byterec",
) -> Path:
    """``path``: ``byterec_sample.txt`` (or its folder)."""
    path = Path(path)
    file = path / "byterec_sample.txt" if path.is_dir() else path

    def build():
        frame = _read_csv(file, (), separator="\t", has_header=False, new_columns=list(BYTEREC_COLUMNS))
        if frame.width != len(BYTEREC_COLUMNS):
            raise DataValidationError(
                f"{file}: expected {len(BYTEREC_COLUMNS)} tab-separated fields, found {frame.width}."
            )
        parts = random_parts(frame.height, fractions, seed)
        categorical = ["uid", "user_city", "item_id", "author_id", "item_city", "channel", "music_id", "device"]
        labels = {"finish": pl.col("finish").cast(pl.Int8), "like": pl.col("like").cast(pl.Int8)}
        return encode_tabular(frame, parts, categorical, ["duration_time"], labels, str(file)), list(labels)

    params = {"format": "byterec", "fractions": list(fractions), "seed": seed}
    return prepare_tabular(name, Path(cache_root), params, [file], build)
