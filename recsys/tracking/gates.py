"""Gate / expert utilisation per task: mean gate weights over each validation epoch, plotted into MLflow.

Towers put gate weights into ``TowerOutput.extras`` as ``gate/<task>[/<group>] -> [B, n_experts]``
(group = PLE level, Switch block, TaskExpert layer); the ranking LightningModule's ``validation_step`` returns the
model output, so this callback sees them batch by batch. Per epoch it writes ``plots/gate_usage.png``
(one heat map per group: tasks × experts, mean weight) and ``gates/gate_usage.json`` (every epoch so far).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from recsys.io import atomic_write_bytes
from recsys.tracking.callbacks import _mlflow_logger
from recsys.tracking.figures import pyplot, save_figure


def split_gate_key(key: str) -> tuple[str, str]:
    """``gate/<task>[/<group>]`` -> (task, group or "")."""
    parts = key.split("/")
    return parts[1], "/".join(parts[2:])


def plot_gate_usage(usage: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """One heat map per group (rows: tasks, columns: experts, colour: mean gate weight); atomic PNG write."""
    plt = pyplot()

    groups: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for key, weights in usage.items():
        task, group = split_gate_key(key)
        groups[group][task] = weights
    if not groups:
        return None
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(1.2 + 3.6 * len(groups), 0.9 + 0.45 * max(len(t) for t in groups.values())),
        squeeze=False,
    )
    for ax, (group, rows) in zip(axes[0], sorted(groups.items())):
        tasks = list(rows)
        width = max(len(w) for w in rows.values())
        grid = torch.full((len(tasks), width), float("nan"))
        for i, task in enumerate(tasks):
            grid[i, : len(rows[task])] = torch.tensor(rows[task])
        image = ax.imshow(
            grid.numpy(), vmin=0.0, vmax=max(1e-6, float(grid.nan_to_num(0).max())), cmap="viridis", aspect="auto"
        )
        for (i, j), value in zip(((i, j) for i in range(len(tasks)) for j in range(width)), grid.flatten().tolist()):
            if value == value:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xticks(range(width))
        ax.set_xlabel("expert")
        ax.set_title(group or "gates", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    return save_figure(fig, path, title, fontsize=9)


class GateUsage(pl.Callback):
    """Averages ``gate/*`` extras over validation batches; plots and logs them after each validation epoch.

    ``history`` holds ``{"epoch": e, "usage": {key: mean weights}}`` per epoch (also written as JSON).
    Nothing is written for towers without gates.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._rows = {}, {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for key, value in (getattr(outputs, "extras", None) or {}).items():
            if key.startswith("gate/") and value.dim() == 2:
                total = value.detach().float().sum(0).cpu()
                self._sums[key] = self._sums[key] + total if key in self._sums else total
                self._rows[key] = self._rows.get(key, 0) + value.shape[0]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._sums or not trainer.is_global_zero:
            return
        usage = {k: (s / self._rows[k]).tolist() for k, s in sorted(self._sums.items())}
        epoch = trainer.current_epoch + 1  # counted from 1, as in every plot of the project
        self.history.append({"epoch": epoch, "usage": usage})
        folder = self.output_dir / "plots"
        plot = plot_gate_usage(usage, folder / "gate_usage.png", f"mean validation gate weights, epoch {epoch}")
        table = folder / "gate_usage.json"
        atomic_write_bytes(table, json.dumps(self.history, indent=1).encode())
        logger = _mlflow_logger(trainer)
        if logger is not None:
            if plot is not None:
                logger.experiment.log_artifact(logger.run_id, str(plot), "plots")
            logger.experiment.log_artifact(logger.run_id, str(table), "gates")
