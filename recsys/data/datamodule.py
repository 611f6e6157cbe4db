"""LightningDataModule over a prepared CTR dataset folder (``train/val/test.parquet`` + ``meta.json``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from recsys.data.cache import DatasetMeta, load_meta
from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader
from recsys.data.schema import SPLITS
from recsys.data.tasks import TaskSpec, parse_tasks

log = logging.getLogger(__name__)


class CTRDataModule(pl.LightningDataModule):
    """Prepares (or reuses) a cached dataset, validates each split, and serves :class:`CTRBatch` es.

    Args:
        name: dataset name, used for the MLflow experiment.
        source: callable ``source(cache_root=...) -> Path`` that converts raw data into the cache
            (e.g. a ``_partial_`` of :func:`recsys.data.synthetic.prepare_synthetic`).
        cache_dir: root of the git-ignored parquet cache.
        path: raw-data location (informational here; the ``source`` reads it via ``${data.path}``).
        tasks: task entries (name, label, loss, weight); see :class:`TaskSpec`.
        batch_size / eval_batch_size: rows per training / evaluation batch.
        seed: shuffling seed (the order is a function of seed and epoch, so resumes replay it).
    """

    def __init__(
        self,
        name: str,
        source: Callable[[Path], Path],
        cache_dir: str,
        tasks: Iterable[Mapping[str, Any]] = ({"name": "click", "label": "label"},),
        batch_size: int = 512,
        eval_batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        path: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.source = source
        self.cache_dir = Path(cache_dir)
        self.path = path
        self.tasks: List[TaskSpec] = parse_tasks(tasks)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.drop_last = num_workers, seed, drop_last
        self.dataset_dir: Optional[Path] = None
        self.meta: Optional[DatasetMeta] = None
        self.tables: Dict[str, CTRTable] = {}

    def prepare(self) -> DatasetMeta:
        """Build the cache if needed and read ``meta.json`` (idempotent). Called before the model exists."""
        if self.meta is None:
            self.dataset_dir = Path(self.source(cache_root=self.cache_dir))
            self.meta = load_meta(self.dataset_dir)
            log.info("dataset %s at %s: %s", self.name, self.dataset_dir, self.meta.rows)
        return self.meta

    def backbone_inputs(self) -> Dict[str, Any]:
        """Keyword arguments every CTR backbone factory receives: ``vocab`` and ``max_len``."""
        meta = self.prepare()
        return {"vocab": meta.vocab(), "max_len": meta.max_len}

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        meta = self.prepare()
        labels = {t.name: t.label for t in self.tasks}
        binary = [t.label for t in self.tasks if t.loss == "binary"]
        for split in SPLITS:
            if split not in self.tables:
                self.tables[split] = CTRTable.read_parquet(
                    self.dataset_dir / f"{split}.parquet", labels, meta.vocab(), binary
                )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.tables:
            self.setup()
        table = self.tables[split]
        return batch_loader(BatchedCTRDataset(table), len(table), batch_size, shuffle, self.seed,
                            self.drop_last, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
