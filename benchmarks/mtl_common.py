"""Shared runner of the multi-task benchmarks: compose the Hydra config, train with early stopping on the
mean validation AUC, test the best epoch, and write result rows.

Rows (``benchmarks/results/mtl.jsonl``) have the fields :data:`FIELDS`, and a tuned configuration's rows also
:data:`TUNED_FIELDS` (``tuned: true``, ``trials``: the search's complete trials); per-run details (epochs, best
epoch, validation AUC) go to stderr and, per epoch, to an optional curves file.
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
TUNED_FIELDS = ("tuned", "trials")
#: what identifies a row: a rerun of the same (implementation, backbone, model, dataset, seed, task) replaces it
ROW_KEY = ("implementation", "backbone", "model", "dataset", "seed", "task")


def compose(overrides: Sequence[str]):
    """``configs/train.yaml`` with ``overrides`` (paths pinned to this checkout, no Hydra run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(
            config_name="train",
            overrides=[f"paths.root_dir={REPO}", "paths.output_dir=${paths.log_dir}/bench", *overrides],
        )


def train_and_test(
    overrides: Sequence[str], seed: int, max_epochs: int, patience: int, accelerator: str = "cpu"
) -> dict[str, Any]:
    """One run: fit with early stopping on ``val/auc`` (mean over binary tasks), test the best epoch.

    Returns ``{"test": {metric: value}, "sec_per_epoch": training seconds per epoch (validation excluded),
    "epochs": run, "best_epoch": 1-based, "best_val_auc": float, "curve": [{"epoch": 1-based, "val/auc": ...,
    "val/<task>/auc": ..., "train/loss": ...}, ...]}``.
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

    curve: list[dict[str, float]] = []

    class EpochLog(pl.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            m = trainer.callback_metrics
            point = {"epoch": trainer.current_epoch + 1}
            point.update({k: round(float(v), 6) for k, v in m.items() if k.startswith("val/") or k == "train/loss"})
            curve.append(point)
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
            accelerator=accelerator,
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
        "curve": curve,
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
    tuned: Mapping[str, int] | None = None,
    curves: Path | None = None,
    accelerator: str = "cpu",
) -> None:
    """Every model × seed: :func:`train_and_test` with ``common + models[model] + extra`` overrides, a line
    per run on stderr, result rows written to ``out`` as each run ends (a crash keeps the finished ones; a
    rerun of the same row key replaces the old row). ``tuned``: model -> the search's trial count, for rows
    of a searched configuration (``tuned: true``, ``trials``). ``curves``: a JSON line per epoch and run."""
    import torch

    torch.set_num_threads(threads)
    for model, overrides in models.items():
        for seed in seeds:
            run = train_and_test([*common, *overrides, *extra], seed, max_epochs, patience, accelerator)
            log(
                f"[{model} seed={seed}] {machine_load()} epochs {run['epochs']} best {run['best_epoch']} "
                f"val auc {run['best_val_auc']:.4f} test "
                + " ".join(f"{t} {run['test'][f'test/{t}/auc']:.4f}" for t in tasks)
                + f" {run['sec_per_epoch']:.1f}s/epoch"
            )
            rows = result_rows(model, backbone, dataset, seed, tasks, run)
            if tuned is not None and model in tuned:
                rows = [{**row, "tuned": True, "trials": int(tuned[model])} for row in rows]
            upsert_rows(out, rows)
            if curves is not None:
                lines = [
                    {"model": model, "backbone": backbone, "dataset": dataset, "seed": seed, **point}
                    for point in run["curve"]
                ]
                lines[-1:] = [{**p, "best_epoch": run["best_epoch"]} for p in lines[-1:]]
                with open(curves, "a") as handle:
                    handle.writelines(json.dumps(line) + "\n" for line in lines)


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


def check_row(row: Mapping[str, Any]) -> None:
    """:data:`FIELDS` in order, then nothing or exactly :data:`TUNED_FIELDS`."""
    keys = tuple(row)
    if keys not in (FIELDS, FIELDS + TUNED_FIELDS):
        raise ValueError(f"a result row needs the fields {FIELDS} (+ {TUNED_FIELDS} if tuned), got {keys}")


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for row in rows:
            check_row(row)
            handle.write(json.dumps(row) + "\n")


def upsert_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows``, dropping earlier rows with the same :data:`ROW_KEY` (a rerun replaces its rows)."""
    for row in rows:
        check_row(row)
    new = {tuple(r[k] for k in ROW_KEY) for r in rows}
    old = read_rows(path)
    kept = [r for r in old if tuple(r[k] for k in ROW_KEY) not in new]
    if len(kept) == len(old):
        append_rows(path, rows)
        return
    from benchmarks.common import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in [*kept, *rows]))


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
        trials = {
            r.get("trials") for r in rows if (r["implementation"], r["backbone"], r["model"]) == (impl, backbone, model)
        }
        trials.discard(None)
        label = f"{model} (tuned, {'/'.join(map(str, sorted(trials)))} trials)" if trials else model
        body.append([impl, backbone, label, len(seeds), *cells, f"{np.mean(secs):.1f}" if secs else "–"])
    columns = ["implementation", "backbone", "model", "seeds"]
    columns += [f"{t} {m}" for t in tasks for m in ("AUC", "logloss")] + ["s/epoch"]
    return markdown_table(columns, body).rstrip("\n")


def gap_table(rows: Sequence[dict[str, Any]], dataset: str, reference: str = "lightgbm") -> str:
    """Our models against the ``reference`` implementation's rows, per task: the mean of the per-seed
    differences ``ours(seed) - reference(seed)`` over the seeds both have, with its 95 % Student-t interval
    (same split and seed number; the two sides share no other randomness)."""
    from benchmarks.common import paired_interval

    rows = [r for r in rows if r["dataset"] == dataset]
    ref = {(r["task"], r["seed"]): r["auc"] for r in rows if r["implementation"] == reference}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    keys = list(dict.fromkeys((r["backbone"], r["model"]) for r in rows if r["implementation"] == "ours"))
    body = []
    for backbone, model in keys:
        cells, n = [], 0
        for t in tasks:
            ours = {
                r["seed"]: r["auc"]
                for r in rows
                if (r["implementation"], r["backbone"], r["model"], r["task"]) == ("ours", backbone, model, t)
            }
            seeds = sorted(s for s in ours if (t, s) in ref)
            if len(seeds) < 2:
                cells.append("–")
                continue
            mean, low, high = paired_interval([ours[s] for s in seeds], [ref[(t, s)] for s in seeds])
            cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]")
            n = max(n, len(seeds))
        if n:
            body.append([backbone, model, n, *cells])
    columns = ["backbone", "model", "paired seeds", *(f"{t} AUC − {reference}" for t in tasks)]
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
