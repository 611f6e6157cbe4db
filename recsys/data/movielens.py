"""MovieLens 100K (GroupLens ``ml-100k``) -> CTR samples with a ``rating`` side label.

``u.data`` is tab-separated ``user item rating timestamp`` in random order; ``u.item`` is
``|``-separated latin-1 with 19 genre flags after 5 fields. The category of a movie is its first
flagged genre index + 1 (1..19; a movie without any flag gets 1, the "unknown" genre).
The files come from files.grouplens.org/datasets/movielens/ml-100k.zip (``download=True`` fetches them).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, write_dataset
from recsys.data.protocol import CTRProtocol, build_ctr_samples
from recsys.data.schema import DataValidationError, Vocab
from recsys.errors import InputNotFound

log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = {"u.data": "6e47046882bad158b0efbb84cd5cb987", "u.item": "c9e7f390115d79079537301d5204f3f7"}
NUM_GENRES = 19
ML100K_PROTOCOL = CTRProtocol(
    behaviors=("rating",), min_interactions=0, targets="all", min_history=5, max_len=200, negatives=2
)
_DATA_COLUMNS = ("user", "item", "rating", "timestamp")


def _require(directory: Path, name: str) -> Path:
    """``directory/name`` if it is a file, else InputNotFound naming it and the config key."""
    path = Path(directory) / name
    if not path.is_file():
        raise InputNotFound(
            f"{path}: not found; set data.path=<folder holding the ml-100k files u.data and u.item> "
            f"(or download=True to fetch {ML100K_URL})."
        )
    return path


def _read_ratings(path: Path) -> pl.DataFrame:
    """``u.data`` as user, item, rating (Int8), timestamp."""
    try:
        frame = pl.read_csv(
            path,
            has_header=False,
            separator="\t",
            schema={"user": pl.Int64, "item": pl.Int64, "rating": pl.Int64, "timestamp": pl.Int64},
        )
    except pl.exceptions.PolarsError as err:
        raise DataValidationError(
            f"{path}: expected 4 tab-separated integer columns {list(_DATA_COLUMNS)} ({err})."
        ) from err
    return frame.with_columns(pl.col("rating").cast(pl.Int8))


def _read_genres(path: Path) -> pl.DataFrame:
    """``u.item`` as item, category (first flagged genre + 1)."""
    text = path.read_bytes().decode("latin-1")
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 5 + NUM_GENRES]
    if bad:
        raise DataValidationError(
            f"{path}: line(s) {bad[:5]} do not have {5 + NUM_GENRES} '|'-separated fields "
            f"(id, title, release, video release, url, {NUM_GENRES} genre flags)."
        )
    try:
        ids = np.array([int(r[0]) for r in rows], dtype=np.int64)
        flags = np.array([r[5:] for r in rows], dtype=np.int64)
    except ValueError as err:
        raise DataValidationError(f"{path}: column 'movie_id' or a genre flag is not an integer ({err}).") from err
    category = np.where(flags.any(axis=1), flags.argmax(axis=1), 0) + 1
    return pl.DataFrame({"item": ids, "category": category.astype(np.int64)})


def read_ml100k_log(directory: str | Path) -> pl.DataFrame:
    """Ratings joined with genres, in ``LOG_SCHEMA`` plus ``rating``; sorted by (user, timestamp, item).

    Behaviour is ``"rating"``; ids are GroupLens's own (already dense 1..943 / 1..1682).
    """
    directory = Path(directory)
    data_path, item_path = _require(directory, "u.data"), _require(directory, "u.item")
    ratings, genres = _read_ratings(data_path), _read_genres(item_path)
    frame = ratings.join(genres, on="item", how="left", maintain_order="left")
    unknown = frame.filter(pl.col("category").is_null())["item"].unique()
    if len(unknown):
        raise DataValidationError(
            f"{data_path}: column 'item' has ids missing from {item_path.name}: {unknown.to_list()[:5]}."
        )
    return (
        frame.with_columns(pl.lit("rating").alias("behavior"))
        .select("user", "item", "category", "behavior", "timestamp", "rating")
        .sort(["user", "timestamp", "item"], maintain_order=True)
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def download_ml100k(dest: str | Path, timeout: float = 60.0) -> Path:
    """Fetch ml-100k.zip, extract u.data, u.item and README into ``dest``, verify the md5s.

    Raises DataValidationError on a checksum mismatch (the files are removed again).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(ML100K_URL, timeout=timeout) as response:
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    for name in ("u.data", "u.item", "README"):
        data = archive.read(f"ml-100k/{name}")
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, dest / name)
    for name, expected in ML100K_MD5.items():
        got = _md5(dest / name)
        if got != expected:
            (dest / name).unlink()
            raise DataValidationError(f"{dest / name}: md5 {got} != expected {expected} (download from {ML100K_URL}).")
    return dest


def prepare_ml100k(
    path: str | Path,
    cache_root: str | Path,
    protocol: CTRProtocol | Mapping[str, Any] | None = None,
    download: bool = False,
    like_threshold: int | None = None,
) -> Path:
    """Read -> build samples (``targets="all"`` by default) -> cache (name ``ml100k``, extra ``rating``).

    ``download=True`` fetches the archive into ``path`` when ``u.data`` is missing there.
    ``like_threshold`` adds the label column ``like`` = ``rating >= like_threshold`` (Int8; 0 for the
    sampled negatives, whose rating is 0), for multi-task runs (``data=ml100k_mtl``).
    """
    protocol = CTRProtocol.coerce(protocol or ML100K_PROTOCOL)
    path = Path(path)
    if download and not (path / "u.data").is_file():
        download_ml100k(path)
    inputs = [_require(path, "u.data"), _require(path, "u.item")]
    params = {"protocol": protocol.to_dict()}
    if like_threshold is not None:  # only then: the plain dataset keeps its fingerprint
        params["like_threshold"] = int(like_threshold)
    fp = fingerprint("ml100k", params, inputs)
    hit = cached_dataset(Path(cache_root), "ml100k", fp)
    if hit is not None:
        log.info("ml100k: reusing cached dataset %s", hit)
        return hit
    events = read_ml100k_log(path)
    vocab = Vocab(int(events["user"].max()), int(events["item"].max()), NUM_GENRES)
    splits = build_ctr_samples(events, protocol, extra_columns=("rating",), vocab=vocab, source=str(path))
    extra = ["rating"]
    if like_threshold is not None:
        like = (pl.col("rating") >= like_threshold).cast(pl.Int8).alias("like")
        splits = {k: v.with_columns(like) for k, v in splits.items()}
        extra.append("like")
    meta = DatasetMeta.for_splits("ml100k", fp, vocab, protocol.max_len, splits, params, extra)
    return write_dataset(Path(cache_root), meta, splits)
