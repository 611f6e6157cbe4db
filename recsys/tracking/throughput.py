"""Training throughput measured inside the real run (``pipelines.train``), logged to the run's loggers.

After ``warmup_steps`` optimiser steps (lazy inits, allocator growth, Triton autotuning), every
``every_n_steps`` steps the callback waits for the device (one ``torch.cuda.synchronize`` per window, not
per step) and logs ``perf/samples_per_s`` and ``perf/step_ms`` over the window; at the end of fitting,
``perf/steady_samples_per_s`` over all complete windows (validation and what follows the last window, e.g. the
epoch-end checkpoint of a run stopped by ``max_steps``, excluded; with no complete window, everything since the
warm-up) and ``perf/median_window_samples_per_s``, the median of the windows' rates (one slow window, e.g. a pause
of the machine, moves the steady rate but not the median; both land in the run's ``metrics.json``). Data loading,
the host-to-device copies, the step, logging and periodic checkpoints are all inside the windows.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch


class Throughput(pl.Callback):
    def __init__(self, every_n_steps: int = 50, warmup_steps: int = 20) -> None:
        if every_n_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need every_n_steps >= 1 and warmup_steps >= 0, got {every_n_steps}, {warmup_steps}")
        self.every_n_steps, self.warmup_steps = every_n_steps, warmup_steps
        self.steps = 0
        self._window = self._total = None  # (time, samples) at the window's / the measurement's start
        self.samples = 0
        self.paused = 0.0  # seconds spent in validation since the measurement started
        self._val_start = 0.0
        self.steady: float | None = None
        self.window_seconds = 0.0  # summed over complete windows
        self.window_samples = 0
        self.window_rates: list[float] = []  # samples/s of each complete window

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int):
        self.steps += 1
        if self.steps <= self.warmup_steps:
            if self.steps == self.warmup_steps:
                now = self._now(pl_module)
                self._window = self._total = (now, 0)
            return
        if self._total is None:  # warmup_steps == 0
            self._window = self._total = (self._now(pl_module), 0)
        self.samples += int(getattr(batch, "batch_size", 0))
        if (self.steps - self.warmup_steps) % self.every_n_steps == 0:
            now = self._now(pl_module)
            start, done = self._window
            seconds = now - start
            self.window_seconds += seconds
            self.window_samples += self.samples - done
            self.window_rates.append((self.samples - done) / seconds)
            self._publish(
                trainer,
                {
                    "perf/samples_per_s": self.window_rates[-1],
                    "perf/step_ms": 1000 * seconds / self.every_n_steps,
                },
            )
            self._window = (now, self.samples)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = self._now(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._total is not None and not trainer.sanity_checking:
            paused = self._now(pl_module) - self._val_start
            self.paused += paused
            self._window = (self._window[0] + paused, self._window[1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._total is None or self.samples == 0:
            return
        if self.window_seconds > 0:
            self.steady = self.window_samples / self.window_seconds
        else:
            self.steady = self.samples / (self._now(pl_module) - self._total[0] - self.paused)
        final = {"perf/steady_samples_per_s": self.steady}
        if self.window_rates:
            final["perf/median_window_samples_per_s"] = statistics.median(self.window_rates)
        self._publish(trainer, final)
        for name, value in final.items():  # -> the run's metrics.json
            trainer.callback_metrics[name] = torch.tensor(value)

    @staticmethod
    def _publish(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Straight to the loggers (Lightning's own logging would hold them to its log_every_n_steps)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
