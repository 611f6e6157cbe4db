"""Prepare a dataset's cache, and optionally export a split as a scoring log with raw ids.

    python -m pipelines.prepare data=ml100k data.path=<folder with u.data and u.item>
    python -m pipelines.prepare data=synthetic export.split=test export.dir=logs/example_logs export.files=4

The export maps table rows back to the raw ids of the source (through the stored id maps), so the
files look like production logs: user, item, category, timestamp, label, hist_item, hist_cat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipelines._cli import entry_point
from recsys.data.ctr_table import list_column_arrays
from recsys.scoring.writer import AtomicParquetWriter


def to_raw_ids(frame: pl.DataFrame, dataset_dir: Path) -> pl.DataFrame:
    """Replace table rows by raw ids using ``id_map_<column>.parquet`` (identity where absent)."""
    for column, lists in (("user", ()), ("item", ("hist_item",)), ("category", ("hist_cat",))):
        path = dataset_dir / f"id_map_{column}.parquet"
        if not path.exists():
            continue
        id_map = pl.read_parquet(path)
        lookup = np.zeros(int(id_map["id"].max()) + 1, dtype=np.int64)
        lookup[id_map["id"].to_numpy()] = id_map["raw"].to_numpy()
        frame = frame.with_columns(pl.Series(column, lookup[frame[column].to_numpy()]))
        for list_column in lists:
            values, offsets = list_column_arrays(frame, list_column)
            mapped = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(lookup[values]))
            frame = frame.with_columns(pl.Series(list_column, mapped).cast(pl.List(pl.Int64)))
    return frame


def export(dataset_dir: Path, split: str, out_dir: Path, files: int) -> None:
    frame = to_raw_ids(pl.read_parquet(dataset_dir / f"{split}.parquet"), dataset_dir)
    bounds = np.linspace(0, frame.height, files + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        with AtomicParquetWriter(out_dir / f"part-{i:04d}.parquet", {"recsys.source": dataset_dir.name}) as writer:
            writer.write(frame.slice(int(a), int(b - a)))
            writer.commit()
    print(f"exported {frame.height} rows of {dataset_dir.name}/{split} to {out_dir} ({files} files)")


@entry_point("prepare")
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data)
    meta = datamodule.prepare()
    print(f"dataset {meta.name} ready at {datamodule.dataset_dir}: {meta.rows}")
    if cfg.export.split:
        export(Path(datamodule.dataset_dir), cfg.export.split, Path(cfg.export.dir), int(cfg.export.files))


if __name__ == "__main__":
    main()
