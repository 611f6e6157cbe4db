"""Train, validate and test a model; everything is tracked in MLflow.

    python -m pipelines.train recsys=dare
    python -m pipelines.train recsys=twin data=ml100k data.path=../shared/data/ml-100k trainer.max_epochs=3
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from recsys.data.schema import DataValidationError
from recsys.ops.jagged import kernel_backend
from recsys.tracking.callbacks import MLflowRunFiles
from recsys.tracking.mlflow import flatten, git_commit, run_name

log = logging.getLogger("pipelines.train")

USER_ERRORS = (DataValidationError, FileNotFoundError, PermissionError, ValueError)


def choices(cfg: DictConfig) -> Dict[str, str]:
    """Group options picked for this run (``recsys``, ``mtl``, ``data``, ...), from Hydra when available."""
    if HydraConfig.initialized():
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    return {"recsys": "custom", "mtl": "single", "data": str(cfg.data.name)}


def build(cfg: DictConfig) -> Tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data module (prepared, so its vocabulary is known), then the task builder assembles
    backbone (``recsys``) -> tower (``mtl``) -> LightningModule (``task``)."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare()
    task = instantiate(cfg.task)(
        datamodule=datamodule,
        backbone=instantiate(cfg.recsys),
        tower=instantiate(cfg.mtl),
        init_std=cfg.model.init_std,
    )
    return datamodule, task


def train(cfg: DictConfig) -> Dict[str, float]:
    """Fit, then test the best checkpoint; returns the final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    picked = choices(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name = cfg.run_name or run_name(picked.get("recsys", "model"), picked.get("mtl"), cfg.data.name, resolved)
    resolved["run_name"] = name
    output_dir = Path(cfg.paths.output_dir)

    datamodule, task = build(cfg)
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
    }
    logger = instantiate(cfg.logger, run_name=name, tags=tags)
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
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=[checkpoint, files],
                                      default_root_dir=str(output_dir))
    log.info("run %s -> %s (jagged kernels: %s)", name, output_dir, tags["jagged_kernels"])
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test_after_fit:
        ckpt = "best" if checkpoint.best_model_path else None
        results = trainer.test(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    metrics["best_model_path"] = checkpoint.best_model_path  # type: ignore[assignment]
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
