"""LightningDataModule over a prepared CTR dataset folder (``train/val/test.parquet`` + ``meta.json``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mtl.spec import TaskSpec, parse_tasks
from recsys.data.cache import DatasetMeta, load_meta
from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader, epoch_sampler
from recsys.data.device_batches import DeviceBatchLoader, DeviceTable
from recsys.data.schema import SPLITS
from recsys.errors import ConfigError

log = logging.getLogger(__name__)


class CachedDataModule(pl.LightningDataModule):
    """Base of every datamodule: a cached dataset folder (``meta.json`` + ``train/val/test.parquet``, built
    once by ``source``) read split by split and served as whole batches in an order fixed by (seed, epoch)
    through the resumable loader.

    Subclasses give :meth:`read_split` (parquet -> a table whose ``dataset[rows]`` is a batch) and
    :meth:`backbone_inputs` (the keyword arguments every backbone factory of the family receives).

    Args:
        name: dataset name, used for the MLflow experiment.
        source: callable ``source(cache_root=...) -> Path`` that converts raw data into the cache
            (e.g. a ``_partial_`` of :func:`recsys.data.synthetic.prepare_synthetic`).
        cache_dir: root of the git-ignored parquet cache.
        path: raw-data location (informational here; the ``source`` reads it via ``${data.path}``).
        batch_size / eval_batch_size: rows per training / evaluation batch.
        seed: shuffling seed (the order is a function of seed and epoch, so resumes replay it).
        drop_last: drop the last incomplete training batch.
        fixed_shape: batches carry their ids at the fixed shape ``[B, max_len]`` (``CTRBatch.padded``; the
            training batches of sequence data: ``SeqBatch.padded``), no KJT, which the sync-free GPU step (and
            its CUDA graph) reads; ``None`` = when training on CUDA with local (unsharded) tables.
        pin_memory: page-locked batches (non-blocking copies to the GPU); ``None`` = when training on CUDA.
    """

    def __init__(
        self,
        name: str,
        source: Callable[..., Path],
        cache_dir: str,
        path: str | None = None,
        batch_size: int = 512,
        eval_batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        fixed_shape: bool | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.fixed_shape, self.pin_memory = fixed_shape, pin_memory
        self.name, self.source, self.cache_dir, self.path = name, source, Path(cache_dir), path
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.drop_last = num_workers, seed, drop_last
        self.tasks: list[TaskSpec] = []
        self.dataset_dir: Path | None = None
        self.meta: DatasetMeta | None = None
        self.tables: dict[str, Any] = {}

    def prepare(self) -> DatasetMeta:
        """Build the cache if needed and read ``meta.json`` (idempotent). Called before the model exists."""
        if self.meta is None:
            self.dataset_dir = Path(self.source(cache_root=self.cache_dir))
            self.meta = load_meta(self.dataset_dir)
            log.info("dataset %s at %s: %s", self.name, self.dataset_dir, self.meta.rows)
        return self.meta

    def backbone_inputs(self) -> dict[str, Any]:
        raise NotImplementedError

    def read_split(self, file: Path, meta: DatasetMeta) -> Any:
        """One split's parquet file -> a table (``len(table)`` rows, ``BatchedCTRDataset(table)[rows]``)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        meta = self.prepare()
        for split in SPLITS:
            if split not in self.tables:
                self.tables[split] = self.read_split(self.dataset_dir / f"{split}.parquet", meta)

    def on_cuda(self) -> bool:
        """Whether the attached trainer runs on a CUDA device (False without a trainer)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _fixed(self) -> bool:
        """Whether batches carry their ids at the fixed shape (``fixed_shape``, or on CUDA when it is None)."""
        if self.fixed_shape is not None:
            return self.fixed_shape
        return self.on_cuda() and not getattr(self.trainer.strategy, "shards_tables", False)  # DMP reads the KJT

    def dataset(self, split: str) -> Any:
        """``dataset[rows] -> batch`` over one split's table."""
        return BatchedCTRDataset(self.tables[split])

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        pin = self.on_cuda() if self.pin_memory is None else self.pin_memory
        return batch_loader(
            self.dataset(split),
            len(self.tables[split]),
            batch_size,
            shuffle,
            self.seed,
            self.drop_last,
            self.num_workers,
            pin_memory=pin,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


RESIDENT_SHARE = 0.25  # resident=null keeps a split on the GPU when it takes at most this share of free memory


class CTRDataModule(CachedDataModule):
    """Prepares (or reuses) a cached CTR dataset, validates each split, and serves :class:`CTRBatch` es.

    Arguments as :class:`CachedDataModule`, plus ``tasks``: task entries (name, label, loss, weight); see
    :class:`TaskSpec`; and ``resident``: hold each split on the training GPU and gather batches there
    (:mod:`recsys.data.device_batches`: no loader workers, no host-to-device copies per step). ``None`` = when
    training on one CUDA device with fixed-shape batches and the split takes at most 1/4 of the free GPU memory;
    ``True`` insists (a one-line error where it cannot apply); ``False`` = host batches through the DataLoader.
    """

    def __init__(
        self,
        name: str,
        source: Callable[..., Path],
        cache_dir: str,
        tasks: Iterable[Mapping[str, Any]] = ({"name": "click", "label": "label"},),
        batch_size: int = 512,
        eval_batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        path: str | None = None,
        fixed_shape: bool | None = None,
        pin_memory: bool | None = None,
        resident: bool | None = None,
    ) -> None:
        super().__init__(
            name,
            source,
            cache_dir,
            path,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            drop_last,
            fixed_shape,
            pin_memory,
        )
        self.tasks = parse_tasks(tasks)
        if resident not in (None, True, False):
            raise ConfigError(f"data.resident={resident!r}: choose true, false or null")
        self.resident = resident
        self.device_tables: dict[str, DeviceTable] = {}

    def dataset(self, split: str) -> BatchedCTRDataset:
        """CTR batches; with ``fixed_shape`` (or on CUDA when it is None) also padded to ``max_len``."""
        table = self.tables[split]
        if not isinstance(table, CTRTable):  # tabular batches have no histories
            return BatchedCTRDataset(table)
        return BatchedCTRDataset(table, self.prepare().max_len if self._fixed() else None)

    def resident_blocker(self, split: str) -> str | None:
        """Why ``split`` cannot be held on the training device (``None``: it can)."""
        if not self.on_cuda():
            return "the trainer is not on a CUDA device"
        if not isinstance(self.tables[split], CTRTable):
            return "the split has no histories (tabular batches)"
        if not self._fixed():
            return "batches are not at the fixed shape (data.fixed_shape)"
        if self.trainer.world_size != 1 or getattr(self.trainer.strategy, "shards_tables", False):
            return "more than one device"
        return None

    def _device_table(self, split: str) -> DeviceTable | None:
        """The split on the training device when ``resident`` says so (copied once, then reused)."""
        if split in self.device_tables or self.resident is False:
            return self.device_tables.get(split)
        blocker = self.resident_blocker(split)
        if blocker is not None:
            if self.resident:
                raise ConfigError(f"data.resident=true: {blocker}; set data.resident=false or null")
            return None
        width, device = self.prepare().max_len, self.trainer.strategy.root_device
        if self.resident is None:
            need, free = DeviceTable.nbytes_of(self.tables[split], width), torch.cuda.mem_get_info(device)[0]
            if need > RESIDENT_SHARE * free:
                log.info("%s split stays on the host: %.2f GB > 1/4 of %.2f GB free", split, need / 1e9, free / 1e9)
                return None
        self.device_tables[split] = DeviceTable.from_table(self.tables[split], width, device)
        log.info("%s split held on %s (%d rows): batches are gathered there", split, device, len(self.tables[split]))
        return self.device_tables[split]

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader | DeviceBatchLoader:
        self.setup()
        table = self._device_table(split)
        if table is None:
            return super()._loader(split, batch_size, shuffle)
        return DeviceBatchLoader(table, epoch_sampler(len(table), batch_size, shuffle, self.seed, self.drop_last))

    def backbone_inputs(self) -> dict[str, Any]:
        """Keyword arguments every CTR backbone factory receives: ``vocab`` and ``max_len``."""
        meta = self.prepare()
        return {"vocab": meta.vocab(), "max_len": meta.max_len}

    def read_split(self, file: Path, meta: DatasetMeta) -> CTRTable:
        labels = {t.name: t.label for t in self.tasks}
        binary = [t.label for t in self.tasks if t.loss == "binary"]
        return CTRTable.read_parquet(file, labels, meta.vocab(), binary)
