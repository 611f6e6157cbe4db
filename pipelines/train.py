"""Train, validate and test a model; everything is tracked in MLflow.

python -m pipelines.train recsys=dare
python -m pipelines.train recsys=twin data=ml100k data.path=../shared/data/ml-100k trainer.max_epochs=3
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from recsys.bundle import export_bundle
from recsys.compat import versions
from recsys.data.schema import DataValidationError
from recsys.distributed.run import register_rank_resolver, run_context
from recsys.io import write_json_atomic
from recsys.ops.jagged import kernel_backend
from recsys.system import peak_rss_mb
from recsys.tracking.callbacks import EpochTimer, MLflowRunFiles
from recsys.tracking.gates import GateUsage
from recsys.tracking.mlflow import experiment_hash, flatten, git_commit, run_name
from recsys.tracking.resume import PeriodicCheckpoint, check_checkpoint, find_resume_point
from recsys.tracking.sweep import PARENT_ENV

log = logging.getLogger("pipelines.train")
register_rank_resolver()  # ${recsys_rank_subdir:} in configs/trainer/dmp.yaml (one Hydra dir per torchrun rank)

USER_ERRORS = (DataValidationError, FileNotFoundError, PermissionError, ValueError)


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
    datamodule = instantiate(cfg.data)
    datamodule.prepare()
    backbone = instantiate(cfg.recsys)
    if table_device is not None:
        backbone = functools.partial(backbone, device=table_device)
    module = instantiate(cfg.objective)(
        datamodule=datamodule,
        backbone=backbone,
        tower=instantiate(cfg.mtl) if cfg.get("mtl") is not None else None,  # sequential models: no tower
        init_std=cfg.model.init_std,
    )
    return datamodule, module


def extra_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The ``callbacks`` config section: name -> Hydra config of a Lightning callback (null = off)."""
    return [instantiate(spec) for spec in (cfg.get("callbacks") or {}).values() if spec is not None]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    picked = choices(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name = cfg.run_name or run_name(picked.get("recsys", "model"), picked.get("mtl"), cfg.data.name, resolved)
    resolved["run_name"] = name
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
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
        # python, torch, cuda, torchrec, fbgemm, fbgemm_dist (fbgemm-gpu | fbgemm-gpu-cpu): docs/gpu.md
        **{f"version.{k}": v for k, v in versions().items()},
        "sharding": run.path,  # dmp | unsharded_fallback | unsharded (recsys.distributed.env)
        "world_size": str(run.world.world_size),
        "config_hash": experiment_hash(resolved),
        "output_dir": str(output_dir),
    }
    if os.environ.get(PARENT_ENV):  # a job of a multirun sweep: nest under its parent run
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    with run.rank_zero_first():  # the first MLflow client migrates a new sqlite store; ranks must not race
        logger = instantiate(cfg.logger, run_name=name, tags=tags, run_id=resume.run_id)
    if resume.run_id is None:  # MLflow params are immutable: a resumed run keeps its own
        logger.log_hyperparams({**flatten(resolved), "data.fingerprint": meta.fingerprint})

    checkpoint = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="best",
        monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode,
        save_last=True,
        auto_insert_metric_name=False,
    )
    files = MLflowRunFiles(resolved, dataclasses.asdict(meta), str(output_dir))
    timer = EpochTimer()
    gates = GateUsage(str(output_dir))  # per-task gate/expert utilisation plots (multi-task towers)
    periodic = PeriodicCheckpoint(str(output_dir / "checkpoints"), cfg.checkpoint.every_n_steps)
    callbacks = [checkpoint, periodic, files, timer, gates, *extra_callbacks(cfg)]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir))
    log.info("run %s -> %s (jagged kernels: %s)", name, output_dir, tags["jagged_kernels"])
    if resume.checkpoint is not None:
        check_checkpoint(resume.checkpoint, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test_after_fit:
        ckpt = "best" if checkpoint.best_model_path else None
        results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    weights: Any = module.model
    if run.sharded:  # collective: best DCP folder into the shards, whole tensors gathered on rank 0
        weights = run.best_weights(module, module.model, checkpoint.best_model_path)
    elif checkpoint.best_model_path:  # export the best weights, whatever ran last
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
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
    epochs = timer.epoch_seconds
    metrics["time/sec_per_epoch"] = sum(epochs) / len(epochs) if epochs else float("nan")
    metrics["system/peak_rss_mb"] = peak_rss_mb()
    if run.is_zero:
        write_json_atomic(
            output_dir / "metrics.json",
            {**metrics, "run_name": name, "run_id": logger.run_id, "best_model_path": checkpoint.best_model_path},
        )
    log.info("finished %s: %s", name, {k: v for k, v in metrics.items() if k.startswith("test/")})
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, USER_ERRORS):
            _fail(cause)
        raise
    except USER_ERRORS as err:
        _fail(err)


def _fail(err: BaseException) -> None:
    """Bad input or config: one clear line on stderr and exit code 2, not a traceback."""
    print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
