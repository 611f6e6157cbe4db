"""Lightning callbacks that put a run's files into MLflow: config, data fingerprint, curves, best checkpoint."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
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
    """Logs the resolved config and dataset meta at fit start, the training-curve plot after every
    epoch, and the best checkpoint at fit end.

    Args:
        config: resolved run config (plain dict), saved as ``config/config.yaml`` and ``.json``.
        dataset_meta: contents of the dataset's ``meta.json`` (fingerprint, vocab, row counts).
        output_dir: the run's local folder (plots are written there first).
    """

    def __init__(self, config: Mapping[str, Any], dataset_meta: Mapping[str, Any], output_dir: str) -> None:
        self.config, self.dataset_meta = dict(config), dict(dataset_meta)
        self.output_dir = Path(output_dir)
        self.history: list[dict[str, float]] = []

    def _log_file(self, trainer: pl.Trainer, path: Path, artifact_path: str | None = None) -> None:
        logger = _mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            if path.is_dir():  # a sharded (DCP) checkpoint is a folder: keep its name under artifact_path
                folder = f"{artifact_path}/{path.name}" if artifact_path else path.name
                logger.experiment.log_artifacts(logger.run_id, str(path), folder)
            else:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
            (folder / "dataset_meta.json").write_text(json.dumps(self.dataset_meta, indent=2))
            self._log_file(trainer, folder / "config.yaml", "config")
            self._log_file(trainer, folder / "dataset_meta.json", "config")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after the epoch's validation, so both train and val metrics of this epoch are known."""
        if not trainer.is_global_zero:
            return
        row = {"epoch": float(trainer.current_epoch + 1)}  # 1 = the first epoch, as in pipelines.compare
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val/", "train/")) and key != "train/loss_step":
                row[key.replace("_epoch", "")] = float(value)
        self.history.append(row)
        plot = plot_curves(
            self.history, self.output_dir / "plots" / "training_curves.png", str(self.config.get("run_name", ""))
        )
        if plot is not None:
            self._log_file(trainer, plot, "plots")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best and Path(best).exists():
            self._log_file(trainer, Path(best), "checkpoints")


class EpochTimer(pl.Callback):
    """Logs ``time/epoch_seconds`` (training epoch wall time, its validation included) and
    ``system/peak_rss_mb`` once per epoch."""

    def __init__(self) -> None:
        self._start = 0.0
        self.epoch_seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        self.epoch_seconds.append(seconds)
        pl_module.log("time/epoch_seconds", seconds, on_epoch=True)
        pl_module.log("system/peak_rss_mb", peak_rss_mb(), on_epoch=True)
