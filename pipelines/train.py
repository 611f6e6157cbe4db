"""Train, validate and test a model; everything is tracked in MLflow.

python -m pipelines.train recsys=dare
python -m pipelines.train recsys=twin data=ml100k data.path=<folder with u.data and u.item> trainer.max_epochs=3
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from pipelines._cli import entry_point
from recsys.bundle import export_bundle
from recsys.compat import versions
from recsys.config_schema import validate_train
from recsys.distributed.run import register_rank_resolver, run_context
from recsys.io import write_json_atomic
from recsys.ops.backend import kernel_family, torch_ops
from recsys.ops.jagged import kernel_backend
from recsys.registry import factory
from recsys.system import peak_rss_mb
from recsys.tracking.callbacks import EpochTimer
from recsys.tracking.mlflow import (
    check_tracking_uri,
    experiment_hash,
    git_commit,
    log_config_files,
    mark_model_training,
    params_and_path_tags,
    run_name,
)
from recsys.tracking.progress import LineProgress, wants_line_progress
from recsys.tracking.resume import check_checkpoint, exit_on_sigterm, find_resume_point
from recsys.tracking.sweep import OVERRIDES_TAG, PARENT_ENV

log = logging.getLogger("pipelines.train")
register_rank_resolver()  # ${recsys_rank_subdir:} in configs/trainer/dmp.yaml (one Hydra dir per torchrun rank)


def choices(cfg: DictConfig) -> dict[str, str]:
    """Group options picked for this run (``recsys``, ``mtl``, ``data``, ...), from Hydra when available."""
    if HydraConfig.initialized():
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    return {"recsys": "custom", "mtl": "single", "data": str(cfg.data.name)}


def build(
    cfg: DictConfig, table_device: torch.device | None = None
) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data module (prepared, so its vocabulary is known), then the objective's builder assembles
    backbone (``recsys``) -> tower (``mtl``) -> LightningModule (``objective``).

    ``table_device``: passed to the backbone factory as ``device`` (``meta`` when DMP shards the tables).
    """
    # registered backbones and towers only (recsys.registry): what trains is what its bundle can rebuild
    backbone = factory(OmegaConf.to_container(cfg.recsys, resolve=True), "recsys")
    tower = factory(OmegaConf.to_container(cfg.mtl, resolve=True), "mtl") if cfg.get("mtl") else None  # seq: none
    datamodule = instantiate(cfg.data)
    datamodule.prepare()
    if table_device is not None:
        backbone = functools.partial(backbone, device=table_device)
    module = instantiate(cfg.objective)(
        datamodule=datamodule,
        backbone=backbone,
        tower=tower,
        init_std=cfg.model.init_std,
    )
    return datamodule, module


def group_hash(cfg: DictConfig) -> str:
    """:func:`experiment_hash` of the config with every ``${seed}`` set to one value: equal for runs that differ
    only in the seed (``pipelines.compare`` and sweep parents average over those)."""
    seedless = cfg.copy()
    seedless.seed = 0
    return experiment_hash(OmegaConf.to_container(seedless, resolve=True))


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The ``callbacks`` config group (configs/callbacks/): name -> Hydra config of a Lightning callback
    (null = off)."""
    return [instantiate(spec) for spec in (cfg.get("callbacks") or {}).values() if spec is not None]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the final metrics."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    validate_train(resolved)  # types and ranges (recsys/config_schema.py), before any data is touched
    pl.seed_everything(cfg.seed, workers=True)
    picked = choices(cfg)
    name = cfg.run_name or run_name(picked.get("recsys", "model"), picked.get("mtl"), cfg.data.name, resolved)
    resolved["run_name"] = name
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    check_tracking_uri(logger_cfg["tracking_uri"])  # a dead server: one line in seconds, before any data work
    resume = find_resume_point(
        cfg.resume, logger_cfg["tracking_uri"], logger_cfg["experiment_name"], experiment_hash(resolved)
    )
    if resume.output_dir is not None:  # continue in the interrupted run's folder
        cfg.paths.output_dir = str(resume.output_dir)
    # torchrun: one process group, rank 0's output folder on every rank, tables on meta under DMP
    run = run_context(cfg.trainer, Path(cfg.paths.output_dir))
    output_dir = run.output_dir

    with run.rank_zero_first():  # rank 0 writes the data cache, the others then read it
        datamodule, module = build(cfg, run.table_device)
    meta = datamodule.meta
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    tags = {
        "recsys": picked.get("recsys", ""),
        "mtl": picked.get("mtl", ""),
        "dataset": meta.name,
        "data_fingerprint": meta.fingerprint,
        "git_commit": git_commit(Path(cfg.paths.root_dir)),
        "seed": str(cfg.seed),
        "device": device,
        "jagged_kernels": kernel_backend(torch.device(device)),
        "kernels": kernel_family(device),  # fbgemm | triton | torch (recsys/ops/backend.py)
        **({"torch_ops": ",".join(sorted(torch_ops()))} if torch_ops() else {}),  # ops forced to their reference
        "precision": str(cfg.trainer.get("precision", "32-true")),
        # python, torch, cuda, torchrec, fbgemm, fbgemm_dist (fbgemm-gpu | fbgemm-gpu-cpu): docs/gpu.md
        **{f"version.{k}": v for k, v in versions().items()},
        "sharding": run.path,  # dmp | unsharded_fallback | unsharded (recsys.distributed.env)
        "world_size": str(run.world.world_size),
        "config_hash": experiment_hash(resolved),
        "group_hash": group_hash(cfg),  # the config hash with the seed left out: runs that are seeds of one config
        "output_dir": str(output_dir),
    }
    params, path_tags = params_and_path_tags(resolved)  # machine paths are tags, the rest params
    tags.update(path_tags)
    if os.environ.get(PARENT_ENV):  # a job of a multirun sweep: nest under its parent run
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        if HydraConfig.initialized():  # the job's overrides: the parent finds the best Optuna trial's run by them
            tags[OVERRIDES_TAG] = json.dumps(list(HydraConfig.get().overrides.task))[:5000]
    with run.rank_zero_first():  # the first MLflow client migrates a new sqlite store; ranks must not race
        logger = instantiate(cfg.logger, run_name=name, tags=tags, run_id=resume.run_id)
    mark_model_training(logger.experiment, logger.experiment_id)  # the UI's model-training view, not GenAI's
    if resume.run_id is None:  # MLflow params are immutable: a resumed run keeps its own
        logger.log_hyperparams({**params, "data.fingerprint": meta.fingerprint})

    if run.is_zero:
        log_config_files(logger, resolved, dataclasses.asdict(meta))
    cfg.run_name, cfg.paths.output_dir = name, str(output_dir)  # what configs/callbacks/*.yaml interpolate
    callbacks = build_callbacks(cfg)
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if cfg.trainer.get("enable_progress_bar", True) and wants_line_progress():
        callbacks.append(LineProgress())  # a log file gets plain lines, not tqdm's carriage returns
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir))
    log.info("run %s -> %s (jagged kernels: %s)", name, output_dir, tags["jagged_kernels"])
    if resume.checkpoint is not None:
        check_checkpoint(resume.checkpoint, module, sharded=run.sharded)
    with exit_on_sigterm(logger, run.is_zero):  # SIGTERM: last.ckpt, MLflow run KILLED, exit 143
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best_path = checkpoint.best_model_path if checkpoint is not None else ""
        if checkpoint is not None and checkpoint.best_model_score is not None:  # the sweep objective (see main)
            metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
        if cfg.test_after_fit:
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    weights: Any = module.model
    if run.sharded:  # collective: best DCP folder into the shards, whole tensors gathered on rank 0
        weights = run.best_weights(module, module.model, best_path)
    elif best_path:  # export the best weights, whatever ran last
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
    if run.is_zero:
        bundle = export_bundle(
            output_dir / "model",
            resolved,
            datamodule.dataset_dir,
            weights,
            {
                "run_name": name,
                "run_id": logger.run_id,
                "data_fingerprint": meta.fingerprint,
                "model_builder": module.model_builder,
            },
        )
        logger.experiment.log_artifacts(logger.run_id, str(bundle), "model")
    timer = next((c for c in callbacks if isinstance(c, EpochTimer)), None)
    epochs, samples = (timer.epoch_seconds, timer.epoch_samples) if timer else ([], [])
    metrics["time/sec_per_epoch"] = sum(epochs) / len(epochs) if epochs else float("nan")
    metrics["time/train_samples_per_s"] = sum(samples) / sum(epochs) if epochs else float("nan")
    metrics["system/peak_rss_mb"] = peak_rss_mb()
    on_device = sorted(getattr(datamodule, "device_tables", {}))  # splits held on the GPU (data.resident)
    metrics["data/train_on_device"] = float("train" in on_device)
    if run.is_zero:
        logger.experiment.set_tag(logger.run_id, "data_on_device", ",".join(on_device) or "none")
    if torch.cuda.is_available() and device == "cuda":
        metrics["system/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if run.is_zero:
        write_json_atomic(
            output_dir / "metrics.json",
            {**metrics, "run_name": name, "run_id": logger.run_id, "best_model_path": best_path},
        )
    log.info("finished %s: %s", name, {k: v for k, v in metrics.items() if k.startswith("test/")})
    return metrics


def objective_value(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """The best validation value of ``checkpoint.monitor`` over the run (its last value without a
    ``model_checkpoint`` callback; NaN if never logged): what a sweeper (Optuna) optimises."""
    monitor = str(cfg.checkpoint.monitor)
    return float(metrics.get(f"best/{monitor}", metrics.get(monitor, float("nan"))))


@entry_point("train")
def main(cfg: DictConfig) -> float:
    return objective_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
