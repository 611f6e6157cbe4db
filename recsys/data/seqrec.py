"""Sequential-recommendation data: S3-Rec files -> cached parquet splits -> :class:`SeqDataModule`.

``prepare_seqrec`` reads any file in the S3-Rec line format (``user item item ...``, oldest first; e.g.
Beauty.txt, Sports_and_Outdoors.txt, Yelp.txt, Toys_and_Games.txt), numbers sparse item ids densely
(``dense_item_ids``; the raw ids are kept in ``id_map_item.parquet``), splits it leave-one-out
(``recsys/data/seqrec_format.py``) and writes ``train/val/test.parquet`` + ``meta.json`` through
:func:`recsys.data.cache.write_dataset` (fingerprinted by the file's bytes and the parameters; atomic).

Parquet schema of every split (one row per user; lists oldest first, jagged, no padding):

==========  ===========  ==================================================================
column      dtype        meaning
==========  ===========  ==================================================================
user        Int64        user id from the file
history     List(Int64)  model input, <= max_len items
targets     List(Int64)  train: the next item after each history position; val/test: [target]
exclude     List(Int64)  val/test: items removed from the ranking (train: empty)
==========  ===========  ==================================================================
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, write_dataset
from recsys.data.ctr_table import BatchedCTRDataset, list_column_arrays
from recsys.data.datamodule import CachedDataModule
from recsys.data.schema import DataValidationError, Vocab
from recsys.data.seqrec_format import Jagged, SeqTable, dense_item_ids, leave_one_out, read_sequences
from recsys.data.transitions import TransitionGraph, build_transition_graph, transition_pairs
from recsys.errors import InputNotFound

log = logging.getLogger(__name__)

LIST_COLUMNS = ("history", "targets", "exclude")
SEQ_SCHEMA = {"user": pl.Int64(), **{c: pl.List(pl.Int64()) for c in LIST_COLUMNS}}


def table_to_frame(table: SeqTable) -> pl.DataFrame:
    """:class:`SeqTable` -> frame in the module's schema (list columns straight from values + offsets)."""
    columns: dict[str, Any] = {"user": pl.Series("user", table.user, dtype=pl.Int64)}
    for name in LIST_COLUMNS:
        jagged: Jagged = getattr(table, name)
        arrow = pa.LargeListArray.from_arrays(pa.array(jagged.offsets, pa.int64()), pa.array(jagged.values, pa.int64()))
        columns[name] = pl.Series(name, arrow)
    return pl.DataFrame(columns).cast(SEQ_SCHEMA)


def frame_to_table(frame: pl.DataFrame, source: str) -> SeqTable:
    """Validate a split frame and convert it to :class:`SeqTable` arrays (zero-copy list columns)."""
    missing = [c for c in SEQ_SCHEMA if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{source}: missing column(s) {missing}; found {frame.columns}.")
    columns = {}
    for name in LIST_COLUMNS:
        values, offsets = list_column_arrays(frame, name)
        columns[name] = Jagged(values, offsets)
    return SeqTable(user=frame["user"].cast(pl.Int64).to_numpy(), **columns)


def prepare_seqrec(path: str | Path | None, cache_root: str | Path, name: str = "seqrec", max_len: int = 50) -> Path:
    """Read -> leave-one-out -> cache ``<cache_root>/<name>-<fingerprint>/``; returns the folder.

    Raises InputNotFound (missing file) or DataValidationError (bad lines, empty or too short
    sequences), naming the file.
    """
    if path is None:
        raise InputNotFound("data.path is not set; give data.path=<file with 'user item item ...' lines>")
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: not found; set data.path=<file with one 'user item item ...' line per user>.")
    params = {"format": "s3rec-lines", "split": "leave-one-out", "max_len": max_len}
    fp = fingerprint(name, params, [path])
    hit = cached_dataset(Path(cache_root), name, fp)
    if hit is not None:
        log.info("%s: reusing cached dataset %s", name, hit)
        return hit
    seqs, raw_items = dense_item_ids(read_sequences(path))  # sparse raw ids -> rows 1..n (id_map_item.parquet)
    splits = {split: table_to_frame(table) for split, table in leave_one_out(seqs, max_len).items()}
    if splits["train"].height == 0:
        raise DataValidationError(f"{path}: no user has 2 or more training items, so there is nothing to train on.")
    meta = DatasetMeta(
        name=name,
        fingerprint=fp,
        num_users=seqs.num_users,
        num_items=seqs.num_items,
        num_categories=0,
        max_len=max_len,
        rows={k: v.height for k, v in splits.items()},
        params={**params, "source": str(path), "interactions": int(len(seqs.items))},
    )
    id_maps = None
    if raw_items is not None:
        rows = np.arange(1, len(raw_items) + 1, dtype=np.int64)
        id_maps = {"item": pl.DataFrame({"raw": raw_items, "id": rows}, schema={"raw": pl.Int64, "id": pl.Int64})}
    return write_dataset(Path(cache_root), meta, splits, id_maps)


class SeqDataModule(CachedDataModule):
    """Prepares (or reuses) a cached sequential dataset and serves :class:`~recsys.data.seq_batch.SeqBatch` es.

    Same contract as :class:`~recsys.data.datamodule.CTRDataModule`: ``prepare() -> meta``,
    ``backbone_inputs()`` (``vocab``, ``max_len``), ``tasks`` (empty: next-item prediction scores the item
    table, it has no tower tasks) and train/val/test dataloaders; plus :meth:`transition_graph` for TED.

    Args:
        name: dataset name (MLflow experiment). source: ``source(cache_root=...) -> Path`` (a ``_partial_``
        of :func:`prepare_seqrec`). cache_dir: parquet cache root. path: the raw file (informational).
        batch_size / eval_batch_size: users per training / evaluation batch. seed: shuffling seed (the rest
        of the keyword arguments: :class:`~recsys.data.datamodule.CachedDataModule`).
        test_each_epoch: also rank the test split after every training epoch (a second validation loader),
            so a benchmark can read when test NDCG crossed a level; model selection still reads validation only.
        fixed_shape: training batches right-padded to ``[B, max_len]`` (``SeqBatch.padded``: fixed shapes, what
            ``objective.cuda_graph`` records; every slot is computed, padding ones left out of the losses);
            ``None`` = when training on CUDA with a local item table. Evaluation batches stay jagged.
        pin_memory: page-locked batches; ``None`` = when training on CUDA.
    """

    def __init__(
        self,
        name: str,
        source: Any,
        cache_dir: str,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        test_each_epoch: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, source, cache_dir, batch_size=batch_size, eval_batch_size=eval_batch_size, **kwargs)
        self.test_each_epoch = test_each_epoch

    def dataset(self, split: str) -> BatchedCTRDataset:
        """Batches of one split; the training split's at the fixed shape when :meth:`_fixed`."""
        width = self.prepare().max_len if split == "train" and self._fixed() else None
        return BatchedCTRDataset(self.tables[split], width)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split; with ``test_each_epoch`` also the test split (dataloader index 1)."""
        val = super().val_dataloader()
        return [val, self.test_dataloader()] if self.test_each_epoch else val

    def backbone_inputs(self) -> dict[str, Any]:
        """``vocab`` (``num_items`` sizes the item table) and ``max_len``."""
        meta = self.prepare()
        return {"vocab": Vocab(meta.num_users, meta.num_items, 0), "max_len": meta.max_len}

    def read_split(self, file: Path, meta: DatasetMeta) -> SeqTable:
        if not file.exists():
            raise InputNotFound(f"{file}: no such parquet file")
        return frame_to_table(pl.read_parquet(file), str(file))

    def transition_graph(self, span: int = 1) -> TransitionGraph:
        """TED's graph from the training split only (validation and test items never enter it)."""
        self.setup()
        train = self.tables["train"]
        src, dst = transition_pairs(
            torch.tensor(train.history.values),
            torch.tensor(train.targets.values),
            torch.tensor(train.history.lengths),
            span,
        )
        return build_transition_graph(src, dst, self.prepare().num_items)
