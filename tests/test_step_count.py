"""One step = one training batch, with two optimisers under manual optimisation.

Lightning counts every ``LightningOptimizer.step()`` as a global step; without
``recsys.training.base.uncounted`` a sparse + dense module advanced ``trainer.global_step`` by 2 per batch,
halving ``max_steps`` and ``checkpoint.every_n_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from recsys.compat import EmbeddingCollection, EmbeddingConfig
from recsys.tracking.resume import LAST, PeriodicCheckpoint
from recsys.training.base import SparseDenseModule, split_sparse_dense

BATCHES_PER_EPOCH = 10


@dataclass
class Batch:
    ids: torch.Tensor  # [B] table rows
    y: torch.Tensor  # [B] targets

    @property
    def batch_size(self) -> int:
        return self.ids.numel()


class Tiny(nn.Module):
    """One TorchRec table (sparse optimiser) and one linear head (dense optimiser)."""

    def __init__(self) -> None:
        super().__init__()
        config = EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=16, feature_names=["f"])
        self.tables = EmbeddingCollection(tables=[config], device=torch.device("cpu"))
        self.head = nn.Linear(4, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.tables.embeddings["t"](batch.ids)).squeeze(-1)


class TinyModule(SparseDenseModule):
    def __init__(self) -> None:
        sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
        super().__init__(Tiny(), sgd, sgd)
        self.batches_seen = 0

    def compute_losses(self, batch: Batch, out: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches_seen += 1
        return {"total": nn.functional.mse_loss(out, batch.y)}


class StepLogger(Logger):
    """Records the step every ``train/loss_step`` value is logged at."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    name, version = "steps", "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if "train/loss_step" in metrics:
            self.steps.append(step)


class SaveSpy(pl.Callback):
    """Before PeriodicCheckpoint in the callback list: wraps ``trainer.save_checkpoint`` to record
    (batches trained, ``global_step``) at each save."""

    def __init__(self, module: TinyModule) -> None:
        self.module, self.saves = module, []

    def on_fit_start(self, trainer, pl_module) -> None:
        save = trainer.save_checkpoint

        def recording(path, weights_only=False):
            self.saves.append((self.module.batches_seen, trainer.global_step))
            save(path, weights_only=weights_only)

        trainer.save_checkpoint = recording


def _loader(n: int = BATCHES_PER_EPOCH) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    batches = [Batch(torch.randint(0, 16, (8,), generator=g), torch.randn(8, generator=g)) for _ in range(n)]
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def _fit(tmp_path, **trainer_kwargs) -> tuple[TinyModule, pl.Trainer, SaveSpy, StepLogger]:
    module, logger = TinyModule(), StepLogger()
    spy = SaveSpy(module)
    periodic = PeriodicCheckpoint(str(tmp_path / "checkpoints"), trainer_kwargs.pop("every_n_steps", 10**6))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[spy, periodic],
        enable_checkpointing=True,  # PeriodicCheckpoint is a Checkpoint: Lightning adds no default ModelCheckpoint
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=_loader())
    return module, trainer, spy, logger


def test_the_module_has_two_optimisers():
    sparse, dense = split_sparse_dense(Tiny())
    assert len(sparse) == 1 and len(dense) == 2  # table weight | head weight + bias


def test_max_steps_counts_batches(tmp_path):
    module, trainer, _, _ = _fit(tmp_path, max_steps=7, max_epochs=5)
    assert module.batches_seen == 7
    assert trainer.global_step == 7


def test_every_n_steps_saves_every_n_batches_and_the_checkpoint_counts_batches(tmp_path):
    # 4, not 3: with the 2x bug every_n_steps=3 also saved at batches 3, 6, 9 (2b % 3 == 0 iff b % 3 == 0)
    module, trainer, spy, _ = _fit(tmp_path, every_n_steps=4, max_epochs=2)
    assert module.batches_seen == 2 * BATCHES_PER_EPOCH
    # every 4 batches, and at each epoch end (10, 20) with the newest state; an epoch's last batch is saved once
    assert spy.saves == [(4, 4), (8, 8), (10, 10), (12, 12), (16, 16), (20, 20)]
    state = torch.load(tmp_path / "checkpoints" / LAST, map_location="cpu", weights_only=True)
    assert state["global_step"] == 20


def test_logged_step_axis_advances_one_per_batch(tmp_path):
    _, trainer, _, logger = _fit(tmp_path, log_every_n_steps=2, max_epochs=1)
    # Lightning logs when (batches done) % 2 == 0, at the 0-based index of the batch just trained
    assert logger.steps == [1, 3, 5, 7, 9]
    assert trainer.global_step == BATCHES_PER_EPOCH


def test_resume_continues_the_batch_count(tmp_path):
    _fit(tmp_path, every_n_steps=3, max_steps=6, max_epochs=5)
    module, trainer = (
        TinyModule(),
        pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_steps=13,
            max_epochs=5,
            limit_val_batches=0,
            default_root_dir=str(tmp_path),
        ),
    )
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=str(tmp_path / "checkpoints" / LAST), weights_only=True)
    assert module.batches_seen == 13 - 6
    assert trainer.global_step == 13
