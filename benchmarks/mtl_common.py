"""Shared runner of the multi-task benchmarks: compose the Hydra config, train with early stopping on the
mean validation AUC, test the best epoch, and write result rows.

Rows (``benchmarks/results/mtl.jsonl``) have exactly the fields :data:`FIELDS`; per-run details (epochs,
best epoch, validation AUC) go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, markdown_table, mean_std

FIELDS = ("model", "backbone", "dataset", "seed", "task", "auc", "logloss", "sec_per_epoch", "implementation")


def compose(overrides: Sequence[str]):
    """``configs/train.yaml`` with ``overrides`` (paths pinned to this checkout, no Hydra run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(
            config_name="train",
            overrides=[f"paths.root_dir={REPO}", "paths.output_dir=${paths.log_dir}/bench", *overrides],
        )


def train_and_test(overrides: Sequence[str], seed: int, max_epochs: int, patience: int) -> dict[str, Any]:
    """One run: fit with early stopping on ``val/auc`` (mean over binary tasks), test the best epoch.

    Returns ``{"test": {metric: value}, "sec_per_epoch": training seconds per epoch (validation excluded),
    "epochs": run, "best_epoch": 1-based, "best_val_auc": float}``.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from pipelines.train import build

    cfg = compose([*overrides, f"seed={seed}"])
    pl.seed_everything(seed, workers=True)
    datamodule, task = build(cfg)

    class TrainTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module) -> None:  # validation closes the epoch
            if getattr(self, "_start", None) is not None:
                self.seconds.append(time.perf_counter() - self._start)
                self._start = None

    class EpochLog(pl.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            m = trainer.callback_metrics
            log(
                f"  epoch {trainer.current_epoch + 1}: val auc {float(m.get('val/auc', float('nan'))):.4f} "
                + " ".join(
                    f"{k.split('/')[1]} {float(v):.4f}"
                    for k, v in m.items()
                    if k.startswith("val/") and k.endswith("/auc") and k.count("/") == 2
                )
            )

    timer = TrainTimer()
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        best = ModelCheckpoint(
            dirpath=tmp, filename="best", monitor="val/auc", mode="max", save_top_k=1, auto_insert_metric_name=False
        )
        stop = EarlyStopping(monitor="val/auc", mode="max", patience=patience)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[best, stop, timer, EpochLog()],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp,
        )
        trainer.fit(task, datamodule=datamodule)
        best_val = float(best.best_model_score)
        best_epoch = int(torch_load_epoch(best.best_model_path)) + 1
        test = trainer.test(task, datamodule=datamodule, ckpt_path="best", weights_only=True, verbose=False)[0]
    return {
        "test": {k: float(v) for k, v in test.items()},
        "sec_per_epoch": float(np.mean(timer.seconds)),
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch,
        "best_val_auc": best_val,
    }


def run_grid(
    models: Mapping[str, Sequence[str]],
    common: Sequence[str],
    extra: Sequence[str],
    seeds: Sequence[int],
    tasks: Sequence[str],
    backbone: str,
    dataset: str,
    out: Path,
    threads: int,
    max_epochs: int,
    patience: int,
) -> None:
    """Every model × seed: :func:`train_and_test` with ``common + models[model] + extra`` overrides, a line
    per run on stderr, result rows appended to ``out`` as each run ends (a crash keeps the finished ones)."""
    import torch

    torch.set_num_threads(threads)
    for model, overrides in models.items():
        for seed in seeds:
            run = train_and_test([*common, *overrides, *extra], seed, max_epochs, patience)
            log(
                f"[{model} seed={seed}] {machine_load()} epochs {run['epochs']} best {run['best_epoch']} "
                f"val auc {run['best_val_auc']:.4f} test "
                + " ".join(f"{t} {run['test'][f'test/{t}/auc']:.4f}" for t in tasks)
                + f" {run['sec_per_epoch']:.1f}s/epoch"
            )
            append_rows(out, result_rows(model, backbone, dataset, seed, tasks, run))


def torch_load_epoch(path: str) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def result_rows(
    model: str,
    backbone: str,
    dataset: str,
    seed: int,
    tasks: Sequence[str],
    run: dict[str, Any],
    implementation: str = "ours",
) -> list[dict[str, Any]]:
    """One row per task with exactly :data:`FIELDS`."""
    return [
        {
            "model": model,
            "backbone": backbone,
            "dataset": dataset,
            "seed": seed,
            "task": t,
            "auc": round(run["test"][f"test/{t}/auc"], 6),
            "logloss": round(run["test"][f"test/{t}/logloss"], 6),
            "sec_per_epoch": round(run["sec_per_epoch"], 3),
            "implementation": implementation,
        }
        for t in tasks
    ]


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for row in rows:
            assert tuple(row) == FIELDS, row
            handle.write(json.dumps(row) + "\n")


def results_table(rows: Sequence[dict[str, Any]], dataset: str) -> str:
    """Mean ± sample std over seeds of test AUC / logloss per (implementation, backbone, model, task);
    null values (a peer that does not report logloss or epochs) show as ``–``."""
    rows = [r for r in rows if r["dataset"] == dataset]
    keys = list(dict.fromkeys((r["implementation"], r["backbone"], r["model"]) for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    body = []
    for impl, backbone, model in keys:
        cells, seeds, secs = [], set(), []
        for t in tasks:
            sel = [
                r
                for r in rows
                if (r["implementation"], r["backbone"], r["model"], r["task"]) == (impl, backbone, model, t)
            ]
            seeds |= {r["seed"] for r in sel}
            secs += [r["sec_per_epoch"] for r in sel if r["sec_per_epoch"] is not None]
            losses = [r["logloss"] for r in sel if r["logloss"] is not None]
            cells += [mean_std([r["auc"] for r in sel]), mean_std(losses)]
        body.append([impl, backbone, model, len(seeds), *cells, f"{np.mean(secs):.1f}" if secs else "–"])
    columns = ["implementation", "backbone", "model", "seeds"]
    columns += [f"{t} {m}" for t in tasks for m in ("AUC", "logloss")] + ["s/epoch"]
    return markdown_table(columns, body).rstrip("\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if Path(path).exists()
        else []
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_load() -> str:
    """``load average`` (1/5/15 min) and cores, to state with the timings."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} cores"
