"""Parquet output that becomes visible only when complete (temp name, fsync, rename)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


def with_outputs(kept: pl.DataFrame, outputs: list[pl.Series]) -> pl.DataFrame:
    """An output frame: the pass-through columns ``kept`` (``n`` rows) and then ``outputs`` (``n`` values each).
    With no pass-through column ``kept`` has no rows in polars (a frame without columns is empty), so the outputs
    alone make the frame."""
    return kept.with_columns(outputs) if kept.width else pl.DataFrame(outputs)


class AtomicParquetWriter:
    """Append frames; :meth:`commit` renames ``<path>.tmp`` to ``path``; :meth:`abort` removes the temp file.

    ``metadata`` lands in the parquet footer (key-value metadata), e.g. the model's identity.
    Use as a context manager: an exception aborts (the temp file is removed); a clean exit does *not* commit --
    call :meth:`commit` (or :meth:`abort`) explicitly, so a file is only visible when the caller says it is whole.
    """

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.metadata = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def write(self, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._schema = table.schema.with_metadata(self.metadata)
            self._writer = pq.ParquetWriter(self.tmp, self._schema, compression="zstd")
        self._writer.write_table(table.cast(self._schema))
        self.rows += frame.height

    def commit(
        self, empty_schema: Mapping[str, pl.DataType] | None = None, footer: Mapping[str, str] | None = None
    ) -> None:
        """Close, fsync and rename into place; ``footer`` adds key-values known only at the end (counts)."""
        if self._writer is None:  # nothing written: still produce a (valid, empty) file
            self.write(pl.DataFrame(schema=dict(empty_schema or {})))
        if footer:
            self._writer.add_key_value_metadata(dict(footer))
        self._writer.close()
        with open(self.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
