"""Content-addressed parquet cache for prepared CTR datasets.

A prepared dataset lives in ``<root>/<name>-<fingerprint>/`` and holds ``train.parquet``,
``val.parquet``, ``test.parquet`` and ``meta.json``. The fingerprint hashes the converter name,
:data:`CACHE_VERSION`, the converter parameters and the bytes of every input file, so any change
to one of them yields a new folder. Folders are written into a hidden temporary folder beside the
target and renamed into place, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data.schema import SPLITS, DataValidationError, Vocab
from recsys.errors import InputNotFound

#: Bump when the sample layout or a converter's semantics change; invalidates every cached folder.
CACHE_VERSION = "2"  # 2: id maps stored beside the splits
META_FILE = "meta.json"
_CHUNK = 1 << 22  # 4 MiB
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes, hashed in chunks; memoised per (path, size, mtime)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: input file not found (needed for the dataset fingerprint).")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def fingerprint(name: str, params: Mapping[str, Any], inputs: Sequence[Path]) -> str:
    """First 16 hex chars of sha256(name, version, sorted-key JSON params, sha256 of each input)."""
    digest = hashlib.sha256()
    digest.update(f"{name}\0{CACHE_VERSION}\0".encode())
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    for path in inputs:
        digest.update(b"\0" + file_sha256(Path(path)).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetMeta:
    """What ``meta.json`` records about a prepared dataset (sizes exclude the padding id 0)."""

    name: str
    fingerprint: str
    num_users: int
    num_items: int
    num_categories: int
    max_len: int
    rows: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)

    @classmethod
    def for_splits(
        cls,
        name: str,
        fingerprint: str,
        vocab: Vocab,
        max_len: int,
        splits: Mapping[str, pl.DataFrame],
        params: dict[str, Any],
        extra_columns: Sequence[str] = (),
    ) -> DatasetMeta:
        """The meta of a converter's output: id-space sizes from ``vocab``, row counts from the ``splits`` frames."""
        return cls(
            name=name,
            fingerprint=fingerprint,
            num_users=vocab.num_users,
            num_items=vocab.num_items,
            num_categories=vocab.num_categories,
            max_len=max_len,
            rows={k: v.height for k, v in splits.items()},
            params=params,
            extra_columns=list(extra_columns),
        )

    def vocab(self) -> Vocab:
        """The id-space sizes as a :class:`~recsys.data.schema.Vocab`."""
        return Vocab(self.num_users, self.num_items, self.num_categories)

    def to_json(self) -> str:
        """Pretty, key-sorted JSON text."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, source: str = META_FILE) -> DatasetMeta:
        """Parse :meth:`to_json` output; raises :class:`DataValidationError` naming missing keys."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{source}: not valid JSON ({err}).") from err
        missing = [
            k for k in ("name", "fingerprint", "num_users", "num_items", "num_categories", "max_len") if k not in data
        ]
        if missing:
            raise DataValidationError(f"{source}: missing key(s) {missing}.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def dataset_dir(root: Path, name: str, fp: str) -> Path:
    """``<root>/<name>-<fp>``."""
    return Path(root) / f"{name}-{fp}"


def cached_dataset(root: Path, name: str, fp: str) -> Path | None:
    """The dataset folder if it exists and holds ``meta.json``, else ``None``."""
    path = dataset_dir(root, name, fp)
    return path if (path / META_FILE).is_file() else None


def load_meta(directory: Path) -> DatasetMeta:
    """Read ``<directory>/meta.json``; InputNotFound names the file."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise InputNotFound(f"{path}: not found; is {directory} a prepared dataset folder?")
    return DatasetMeta.from_json(path.read_text(), source=str(path))


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories only where the OS allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_contents(
    tmp: Path, meta: DatasetMeta, splits: Mapping[str, pl.DataFrame], id_maps: Mapping[str, pl.DataFrame] | None = None
) -> None:
    """Write every split, the id maps and ``meta.json`` into ``tmp`` and fsync them."""
    for column, frame in (id_maps or {}).items():
        target = tmp / f"id_map_{column}.parquet"
        frame.write_parquet(target)
        _fsync_path(target)
    for split in SPLITS:
        if split not in splits:
            raise DataValidationError(f"write_dataset({meta.name}): split '{split}' is missing.")
        target = tmp / f"{split}.parquet"
        splits[split].write_parquet(target)
        _fsync_path(target)
    meta_path = tmp / META_FILE
    with open(meta_path, "w") as handle:
        handle.write(meta.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(tmp)


def write_dataset(
    root: Path, meta: DatasetMeta, splits: Mapping[str, pl.DataFrame], id_maps: Mapping[str, pl.DataFrame] | None = None
) -> Path:
    """Atomically write ``<root>/<name>-<fingerprint>/``; an existing folder is left untouched.

    ``id_maps`` (column -> ``raw, id`` frame) are stored as ``id_map_<column>.parquet``; a dataset
    without them keeps raw ids (identity maps), as MovieLens does.

    Everything goes to a hidden temp folder in ``root`` first, is fsynced, then renamed into place.
    On any error the temp folder is removed and the error re-raised. Returns the dataset folder.
    """
    root = Path(root)
    target = dataset_dir(root, meta.name, meta.fingerprint)
    if cached_dataset(root, meta.name, meta.fingerprint) is not None:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _write_contents(tmp, meta, splits, id_maps)
        try:
            os.rename(tmp, target)
        except OSError:
            if cached_dataset(root, meta.name, meta.fingerprint) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(root)
    return target
