"""Progress for a log file: plain lines instead of a terminal progress bar.

When stderr is not a terminal (``python -m pipelines.train ... > train.log 2>&1``, a batch scheduler), tqdm's bar
becomes one line of carriage returns tens of kilobytes long. :class:`LineProgress` prints one line every
``every_percent`` of an epoch's training batches and one line per finished epoch, validation and test.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar


def wants_line_progress(stream: Any = None) -> bool:
    """True when ``stream`` (default: stderr) is not an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    return not (hasattr(stream, "isatty") and stream.isatty())


class LineProgress(ProgressBar):
    """``epoch 1/2: 30% (50/167 batches, 12 s)`` lines; ``epoch 1/2 done in 41 s: train/loss=0.69 val/auc=0.71``."""

    def __init__(self, every_percent: int = 10, stream: Any = None) -> None:
        super().__init__()
        self.every_percent = every_percent
        self.stream = stream
        self._enabled = True
        self._next = every_percent
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        if self._enabled:
            print(line, file=self.stream or sys.stderr, flush=True)

    def _epoch(self, trainer: pl.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        return f"epoch {trainer.current_epoch + 1}/{total}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._next, self._start = self.every_percent, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        total = self.total_train_batches
        if not total or math.isinf(total):
            return
        done = batch_idx + 1
        if 100 * done >= self._next * total and done < total:
            seconds = time.perf_counter() - self._start
            self._print(
                f"{self._epoch(trainer)}: {100 * done // total}% ({done}/{int(total)} batches, {seconds:.0f} s)"
            )
            while 100 * done >= self._next * total:
                self._next += self.every_percent

    def _metrics(self, trainer: pl.Trainer, prefix: tuple[str, ...]) -> str:
        shown = [
            f"{k.replace('_epoch', '')}={float(v):.4f}"
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith(prefix) and not k.endswith("_step")
        ]
        return " ".join(shown)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        self._print(f"{self._epoch(trainer)} done in {seconds:.0f} s: {self._metrics(trainer, ('train/', 'val/'))}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(f"test: {self._metrics(trainer, ('test/',))}")
