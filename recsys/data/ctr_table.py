"""CTR samples held as flat numpy arrays, sliced into :class:`CTRBatch` es without per-row Python."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from recsys.data.batch import CTRBatch, PaddedHistory, make_ctr_kjt
from recsys.data.schema import DataValidationError, Vocab, validate_samples
from recsys.data.seqrec_format import offsets_of, pad_jagged, take_segments
from recsys.errors import InputNotFound


def list_column_arrays(frame: pl.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (values, offsets) of a list column, as int64 numpy arrays."""
    arrow = frame[column].to_arrow()
    if isinstance(arrow, pa.ChunkedArray):
        arrow = arrow.combine_chunks()
    arrow = arrow.cast(pa.large_list(pa.int64()))
    offsets = np.asarray(arrow.offsets, dtype=np.int64)
    values = np.asarray(arrow.values, dtype=np.int64)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def gather_jagged(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Select ``rows`` of a jagged array: returns (flat values, lengths ``[len(rows)]``)."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return take_segments(values, starts, lengths).values, lengths


def padded_history(
    hist_item: np.ndarray,
    hist_cat: np.ndarray,
    lengths: np.ndarray,
    target_item: np.ndarray,
    target_cat: np.ndarray,
    width: int,
) -> PaddedHistory:
    """Flat histories ``hist_item, hist_cat [sum(lengths)]`` (oldest first, no row longer than ``width``) and
    ``target_item, target_cat [B]`` -> the fixed-shape ids of :class:`PaddedHistory`: ``[B, width]`` matrices
    right-padded with 0 (:func:`pad_jagged`: int32 when the ids fit), ``lengths [B]`` int64, targets int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = offsets_of(lengths)
    return PaddedHistory(
        torch.from_numpy(pad_jagged(hist_item, offsets, width)),
        torch.from_numpy(pad_jagged(hist_cat, offsets, width)),
        torch.from_numpy(lengths),
        torch.from_numpy(np.array(target_item, dtype=np.int64)),  # copies: the batch holds no view of a buffer
        torch.from_numpy(np.array(target_cat, dtype=np.int64)),
    )


@dataclass
class CTRTable:
    """Column arrays of one split.

    ``hist_item``/``hist_cat`` share ``hist_offsets [N + 1]``; ``labels`` maps task name -> ``[N]`` float32.
    """

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    hist_item: np.ndarray
    hist_cat: np.ndarray
    hist_offsets: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @classmethod
    def from_frame(
        cls,
        frame: pl.DataFrame,
        source: str,
        label_columns: dict[str, str],
        vocab: Vocab | None = None,
        binary_labels: Sequence[str] = ("label",),
    ) -> CTRTable:
        """Validate ``frame`` (see :func:`validate_samples`) and convert it to arrays.

        ``label_columns`` maps task name -> column; only ``binary_labels`` columns must be 0/1.
        """
        for column in label_columns.values():
            if column not in frame.columns:
                raise DataValidationError(f"{source}: missing label column '{column}'; found {frame.columns}.")
        validate_samples(frame, source, vocab, label_columns=list(binary_labels))
        hist_item, offsets = list_column_arrays(frame, "hist_item")
        hist_cat, cat_offsets = list_column_arrays(frame, "hist_cat")
        if not np.array_equal(offsets, cat_offsets):  # validate_samples checks lengths; belt and braces
            raise DataValidationError(f"{source}: 'hist_item' and 'hist_cat' are not aligned.")
        labels = {}
        for task, column in label_columns.items():
            values = frame[column].cast(pl.Float32).to_numpy()
            if not np.isfinite(values).all():
                raise DataValidationError(f"{source}: column '{column}' holds NaN or infinite labels.")
            labels[task] = values
        return cls(
            user=frame["user"].cast(pl.Int64).to_numpy(),
            item=frame["item"].cast(pl.Int64).to_numpy(),
            category=frame["category"].cast(pl.Int64).to_numpy(),
            hist_item=hist_item,
            hist_cat=hist_cat,
            hist_offsets=offsets,
            labels=labels,
        )

    @classmethod
    def read_parquet(
        cls,
        path: Path,
        label_columns: dict[str, str],
        vocab: Vocab | None = None,
        binary_labels: Sequence[str] = ("label",),
    ) -> CTRTable:
        """Read and validate one split file; unreadable files raise naming the path."""
        if not Path(path).exists():
            raise InputNotFound(f"{path}: no such parquet file")
        try:
            frame = pl.read_parquet(path)
        except Exception as err:  # polars raises several types for corrupt or truncated files
            raise DataValidationError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from err
        return cls.from_frame(frame, str(path), label_columns, vocab, binary_labels)

    def padded(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(hist_item, hist_cat)`` as ``[N, width]`` matrices (:func:`pad_jagged`), built once per width."""
        cache = self.__dict__.setdefault("_padded", {})
        if width not in cache:
            cache[width] = (
                pad_jagged(self.hist_item, self.hist_offsets, width),
                pad_jagged(self.hist_cat, self.hist_offsets, width),
            )
        return cache[width]

    def padded_batch(self, rows: np.ndarray, width: int) -> CTRBatch:
        """Rows -> a fixed-shape :class:`CTRBatch` (``padded`` ids ``[B, width]``, no KJT): two row gathers of
        the :meth:`padded` matrices, the cheapest batch to build and to copy."""
        rows = np.asarray(rows, dtype=np.int64)
        hist_item, hist_cat = self.padded(width)
        padded = PaddedHistory(
            torch.from_numpy(hist_item[rows]),
            torch.from_numpy(hist_cat[rows]),
            torch.from_numpy(self.hist_offsets[rows + 1] - self.hist_offsets[rows]),
            torch.from_numpy(self.item[rows]),
            torch.from_numpy(self.category[rows]),
        )
        return CTRBatch(
            sparse=None,
            labels={t: torch.from_numpy(v[rows]) for t, v in self.labels.items()},
            user=torch.from_numpy(self.user[rows]),
            padded=padded,
        )

    def batch(self, rows: np.ndarray, pad_to: int | None = None) -> CTRBatch:
        """Rows -> :class:`CTRBatch` (vectorised gather of the jagged histories into a KJT); with ``pad_to``,
        the fixed-shape batch of :meth:`padded_batch` instead."""
        if pad_to is not None:
            return self.padded_batch(rows, pad_to)
        rows = np.asarray(rows, dtype=np.int64)
        hist_item, lengths = gather_jagged(self.hist_item, self.hist_offsets, rows)
        hist_cat, _ = gather_jagged(self.hist_cat, self.hist_offsets, rows)
        sparse = make_ctr_kjt(
            torch.from_numpy(hist_item),
            torch.from_numpy(hist_cat),
            torch.from_numpy(lengths),
            torch.from_numpy(self.item[rows]),
            torch.from_numpy(self.category[rows]),
        )
        return CTRBatch(
            sparse=sparse,
            labels={t: torch.from_numpy(v[rows]) for t, v in self.labels.items()},
            user=torch.from_numpy(self.user[rows]),
        )


class BatchedCTRDataset(torch.utils.data.Dataset):
    """``dataset[list_of_rows] -> CTRBatch``; pair with a batch sampler and ``batch_size=None``.

    ``pad_to``: also build the fixed-shape ids ``[B, pad_to]`` (see :meth:`CTRTable.batch`).
    """

    def __init__(self, table: CTRTable, pad_to: int | None = None) -> None:
        self.table, self.pad_to = table, pad_to
        if pad_to is not None:
            table.padded(pad_to)  # built here, before loader workers fork (they share it)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows: Sequence[int]) -> CTRBatch:
        if self.pad_to is None:  # every table's batch(rows); only history tables take pad_to
            return self.table.batch(np.asarray(rows))
        return self.table.batch(np.asarray(rows), self.pad_to)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields each batch's row indices (int64 numpy arrays); the order is a pure function of (seed, epoch).

    Lightning calls :meth:`set_epoch`; ``start_batch`` lets a resumed run skip batches already seen.
    """

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False):
        self.num_rows, self.batch_size, self.shuffle = num_rows, batch_size, shuffle
        self.seed, self.drop_last, self.epoch, self.start_batch = seed, drop_last, 0, 0
        self.yielded = 0  # batches handed out in the current epoch (saved in checkpoints)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def order(self) -> np.ndarray:
        """``[num_rows]`` int64: the current epoch's row order (a permutation when shuffling)."""
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        return np.arange(self.num_rows)

    def spans(self) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` of each batch still to hand out this epoch, in :meth:`order`'s positions (counts them)."""
        start, self.start_batch = self.start_batch, 0
        self.yielded = start
        for b in range(start, len(self)):
            self.yielded = b + 1
            yield b * self.batch_size, min((b + 1) * self.batch_size, self.num_rows)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.order()
        for lo, hi in self.spans():
            yield order[lo:hi]


def epoch_sampler(num_rows: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> EpochBatchSampler:
    """The training (``shuffle``) or evaluation order; evaluation never drops its last, partial batch."""
    return EpochBatchSampler(num_rows, batch_size, shuffle, seed, drop_last and shuffle)


class ResumableState:
    """``state_dict`` / ``load_state_dict`` of a loader with an :class:`EpochBatchSampler` as ``self.sampler``:
    Lightning stores the position (epoch, batches handed out) in checkpoints, so a run resumed from a mid-epoch
    checkpoint continues with the next unseen batch of the same order."""

    sampler: Any

    def state_dict(self) -> dict:
        if not isinstance(self.sampler, EpochBatchSampler):  # wrapped by Lightning for DDP/DMP ranks
            return {}
        return {"epoch": self.sampler.epoch, "batches_done": self.sampler.yielded}

    def load_state_dict(self, state: dict) -> None:
        """Under DDP/DMP (a wrapped sampler) a mid-epoch resume restarts the epoch: not rank-aware yet."""
        if not state or not isinstance(self.sampler, EpochBatchSampler):
            return
        self.sampler.epoch = state["epoch"]
        self.sampler.start_batch = state["batches_done"]


def identity_collate(batch: CTRBatch) -> CTRBatch:
    """Batches come out of the dataset whole; nothing to collate."""
    return batch


class ResumableLoader(ResumableState, torch.utils.data.DataLoader):
    """DataLoader that resumes mid-epoch (:class:`ResumableState`).

    Exact with ``num_workers=0`` (the default): worker prefetching would count batches not yet trained on.
    """


def batch_loader(
    dataset: torch.utils.data.Dataset,
    num_rows: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> ResumableLoader:
    """Whole-batch loading (``dataset[list_of_rows] -> batch``) in an order fixed by (seed, epoch);
    ``pin_memory`` page-locks each batch so its copy to the GPU can be non-blocking."""
    return ResumableLoader(
        dataset,
        sampler=epoch_sampler(num_rows, batch_size, shuffle, seed, drop_last),
        batch_size=None,
        collate_fn=identity_collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
