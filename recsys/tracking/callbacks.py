"""Lightning callbacks that put a run's files into MLflow (config, data fingerprint, curves, best checkpoint), time
epochs, and stop early on several monitors at once (:class:`EarlyStoppingAll`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from recsys.system import peak_rss_mb
from recsys.tracking.figures import pyplot, save_figure

log = logging.getLogger(__name__)


def _mlflow_logger(trainer: pl.Trainer) -> MLFlowLogger | None:
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> Path | None:
    """One panel per metric family (loss, AUC, logloss) against epoch (``history`` rows: ``epoch`` counted from 1,
    metric name -> value); written atomically as PNG."""
    plt = pyplot()

    keys = sorted({k for row in history for k in row if k != "epoch"})
    panels = [
        ("loss", [k for k in keys if k.startswith("train/") and "loss" in k and "/aux" not in k]),
        ("AUC", [k for k in keys if k.endswith("auc") or "gauc" in k]),
        ("logloss", [k for k in keys if k.endswith("logloss")]),
    ]
    panels = [(name, ks) for name, ks in panels if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, ks) in zip(axes[0], panels):
        for k in ks:
            pts = [(row["epoch"], row[k]) for row in history if k in row and not math.isnan(row[k])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


class MLflowRunFiles(pl.Callback):
    """Logs the training-curve plot after every epoch and the best checkpoint at fit end (the resolved config
    and dataset meta are logged by :func:`recsys.tracking.mlflow.log_config_files` when the run starts).

    Args:
        output_dir: the run's local folder (plots are written there first).
        title: plot title (the run name).
    """

    def __init__(self, output_dir: str, title: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.title = title or ""
        self.history: list[dict[str, float]] = []

    def _log_file(self, trainer: pl.Trainer, path: Path, artifact_path: str | None = None) -> None:
        logger = _mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            if path.is_dir():  # a sharded (DCP) checkpoint is a folder: keep its name under artifact_path
                folder = f"{artifact_path}/{path.name}" if artifact_path else path.name
                logger.experiment.log_artifacts(logger.run_id, str(path), folder)
            else:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after the epoch's validation, so both train and val metrics of this epoch are known."""
        if not trainer.is_global_zero:
            return
        row = {"epoch": float(trainer.current_epoch + 1)}  # 1 = the first epoch, as in pipelines.compare
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val/", "train/")) and key != "train/loss_step":
                row[key.replace("_epoch", "")] = float(value)
        self.history.append(row)
        plot = plot_curves(self.history, self.output_dir / "plots" / "training_curves.png", self.title)
        if plot is not None:
            self._log_file(trainer, plot, "plots")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = next((c.best_model_path for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), "")
        if best and Path(best).exists():
            self._log_file(trainer, Path(best), "checkpoints")


class EpochTimer(pl.Callback):
    """Logs ``time/epoch_seconds`` (training epoch wall time, its validation included), ``time/train_seconds``
    (the same without the validation inside the epoch: the training alone), ``time/train_samples_per_s``
    (training samples of the epoch / its wall time) and ``system/peak_rss_mb`` once per epoch."""

    def __init__(self) -> None:
        self._start = self._val_start = self._val_seconds = 0.0
        self._samples = 0
        self.epoch_seconds: list[float] = []
        self.epoch_samples: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = 0
        self._val_seconds = 0.0
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_seconds += time.perf_counter() - self._val_start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._samples += int(batch.batch_size)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        self.epoch_seconds.append(seconds)
        self.epoch_samples.append(self._samples)
        pl_module.log("time/epoch_seconds", seconds, on_epoch=True)
        pl_module.log("time/train_seconds", seconds - self._val_seconds, on_epoch=True)
        pl_module.log("time/train_samples_per_s", self._samples / seconds, on_epoch=True)
        pl_module.log("system/peak_rss_mb", peak_rss_mb(), on_epoch=True)


class EarlyStoppingAll(EarlyStopping):
    """Lightning's ``EarlyStopping`` on ``monitor`` and on every metric in ``also``, each with its own best score and
    wait count (same ``mode``, ``patience``, ``min_delta``): training stops only once *all* of them went ``patience``
    checks without improving. A sequential run that ranks under both protocols (``eval.both_protocols``) uses it with
    ``also=[val_history_kept/ndcg@20]``, so each protocol's best validation epoch is the one a run under that
    protocol alone would have selected (its early stopping would not have stopped the run sooner).
    """

    def __init__(self, monitor: str, also: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(monitor=monitor, **kwargs)
        self.also = {name: EarlyStopping(monitor=name, **kwargs) for name in also}

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        stoppers = [self, *self.also.values()]
        if trainer.fast_dev_run or not all(s._validate_condition_metric(logs) for s in stoppers):
            return
        decisions = [s._evaluate_stopping_criteria(logs[s.monitor].squeeze()) for s in stoppers]
        should_stop = trainer.strategy.reduce_boolean_decision(all(stop for stop, _ in decisions), all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = "; ".join(reason for _, reason in decisions if reason)
            if self.verbose:
                self._log_info(trainer, self.stopping_reason_message, self.log_rank_zero_only)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "also": {name: s.state_dict() for name, s in self.also.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for name, state in state_dict.get("also", {}).items():
            if name in self.also:
                self.also[name].load_state_dict(state)
