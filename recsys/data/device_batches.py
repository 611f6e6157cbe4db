"""CTR splits held on the training GPU: each batch is a few row gathers on the device, not a host-built batch.

At Taobao scale (batch 2048, 200-long histories) a host-built batch is 3.3 MB of ids that loader workers gather,
pass through shared memory, page-lock and copy to the GPU: per step, more host work than the CUDA-graphed step
itself. A split whose fixed-shape ids fit on the device (1 M samples x 200 x 2 int32 ids = 1.6 GB) is copied there
once; each epoch's row order is copied once (``[N]`` int64), and a batch is ``index_select`` of every column with
that order's slice: no loader workers, no page-locked copies, no host work but the launches.

Same order and resume semantics as the host loader (:class:`recsys.data.ctr_table.EpochBatchSampler`), so a run
sees the same batches either way. Plain torch + numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from recsys.data.batch import CTRBatch, PaddedHistory
from recsys.data.ctr_table import CTRTable, EpochBatchSampler, ResumableState


@dataclass
class DeviceTable:
    """One CTR split's columns on a device, at the fixed shape.

    Shapes: ``hist_item, hist_cat [N, L]`` (right-padded with 0, int32 when the ids fit), ``lengths, item,
    category, user [N]`` int64, ``labels``: task -> ``[N]`` float32.
    """

    hist_item: torch.Tensor
    hist_cat: torch.Tensor
    lengths: torch.Tensor
    item: torch.Tensor
    category: torch.Tensor
    user: torch.Tensor
    labels: dict[str, torch.Tensor]

    @staticmethod
    def nbytes_of(table: CTRTable, width: int) -> int:
        """Device bytes :meth:`from_table` would take (the padded matrices' dtype included), without copying."""
        hist_item, hist_cat = table.padded(width)
        columns = [table.item, table.category, table.user, *table.labels.values()]
        return hist_item.nbytes + hist_cat.nbytes + 8 * len(table) + sum(c.nbytes for c in columns)

    @classmethod
    def from_table(cls, table: CTRTable, width: int, device: torch.device | str) -> DeviceTable:
        """Copy ``table`` (its :meth:`CTRTable.padded` matrices at ``width``) to ``device``."""
        hist_item, hist_cat = table.padded(width)
        lengths = table.hist_offsets[1:] - table.hist_offsets[:-1]

        def put(array: np.ndarray) -> torch.Tensor:  # arrow-backed columns are read-only: copied first
            return torch.from_numpy(np.require(array, requirements="W")).to(device)

        return cls(
            put(hist_item),
            put(hist_cat),
            put(lengths),
            put(table.item),
            put(table.category),
            put(table.user),
            {task: put(values) for task, values in table.labels.items()},
        )

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def batch(self, rows: torch.Tensor) -> CTRBatch:
        """``rows [B]`` int64 on the table's device -> the fixed-shape :class:`CTRBatch` of those rows (no KJT)."""

        def take(column: torch.Tensor) -> torch.Tensor:
            return column.index_select(0, rows)

        padded = PaddedHistory(
            take(self.hist_item), take(self.hist_cat), take(self.lengths), take(self.item), take(self.category)
        )
        return CTRBatch(
            sparse=None, labels={t: take(v) for t, v in self.labels.items()}, user=take(self.user), padded=padded
        )


class DeviceBatchLoader(ResumableState):
    """Iterable of :class:`CTRBatch` es gathered on the device from a :class:`DeviceTable`, in ``sampler``'s order.

    What Lightning needs of a training or evaluation loader: ``len``, iteration, ``sampler.set_epoch`` (called
    each epoch) and ``state_dict`` / ``load_state_dict`` (mid-epoch resume, exact: nothing is prefetched).
    """

    batch_sampler = None  # Lightning reads it beside ``sampler`` (whether an evaluation loader shuffles)

    def __init__(self, table: DeviceTable, sampler: EpochBatchSampler) -> None:
        if sampler.num_rows != len(table):
            raise ValueError(f"the sampler orders {sampler.num_rows} rows, the table holds {len(table)}")
        self.table, self.sampler = table, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[CTRBatch]:
        order = torch.from_numpy(self.sampler.order()).to(self.table.device)  # one copy per epoch
        for lo, hi in self.sampler.spans():
            yield self.table.batch(order[lo:hi])
