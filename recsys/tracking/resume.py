"""Finding where to resume: ``resume=auto`` (the latest unfinished run of the same config), an MLflow run
id, or a checkpoint path; plus the periodic ``last.ckpt`` writer that makes resuming possible."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from recsys.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ResumePoint:
    """``checkpoint``: file or DCP folder to load; ``run_id``: MLflow run to continue (None = new run);
    ``output_dir``: the interrupted run's folder (checkpoints keep going there)."""

    checkpoint: str | None = None
    run_id: str | None = None
    output_dir: Path | None = None


def _from_run(run) -> ResumePoint:
    output_dir = Path(run.data.tags.get("output_dir", ""))
    last = output_dir / "checkpoints" / LAST
    if not last.exists():
        raise CheckpointError(f"run {run.info.run_id} has no checkpoint at {last}; nothing to resume from")
    return ResumePoint(str(last), run.info.run_id, output_dir)


def find_resume_point(resume: str | None, tracking_uri: str, experiment: str, config_hash: str) -> ResumePoint:
    """Interpret the ``resume`` option.

    * ``None``: start fresh.
    * ``auto``: the most recent unfinished (killed, failed or still marked running) run of this experiment
      with the same config hash and a ``last.ckpt``; fresh if there is none.
    * a 32-hex MLflow run id: that run's ``last.ckpt``, logging into the same run.
    * anything else: a checkpoint path, logged as a new run.
    """
    if resume is None:
        return ResumePoint()
    if resume != "auto" and not RUN_ID.match(str(resume)):
        if not Path(resume).exists():
            raise CheckpointError(f"resume={resume}: no such checkpoint (give a path, an MLflow run id or 'auto')")
        return ResumePoint(str(resume))
    from mlflow.tracking import MlflowClient

    from recsys.tracking.mlflow import check_tracking_uri

    check_tracking_uri(tracking_uri)  # seconds, not MLflow's minutes of retries
    client = MlflowClient(tracking_uri=tracking_uri)
    if resume != "auto":
        return _from_run(client.get_run(resume))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return ResumePoint()
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if (Path(run.data.tags.get("output_dir", "")) / "checkpoints" / LAST).exists():
            log.info("resume=auto: continuing run %s (%s)", run.info.run_id, run.info.run_name)
            return _from_run(run)
    log.info("resume=auto: no unfinished run with config hash %s; starting fresh", config_hash)
    return ResumePoint()


class PeriodicCheckpoint(Checkpoint):
    """The one ``<dirpath>/last.ckpt``: written every ``every_n_steps`` steps (one step = one training batch,
    whatever the number of optimisers: :meth:`recsys.training.base.SparseDenseModule.optimisation_step`) and at
    the end of every training epoch (after its validation), so it always holds the newest state (ModelCheckpoint
    writes only
    ``best.ckpt``; ``resume=`` reads this file).

    A :class:`Checkpoint` subclass, so Lightning runs its epoch-end hook after the LightningModule's and after
    early stopping, as for ModelCheckpoint. Lightning writes checkpoint files atomically (a temporary file moved
    into place), and the DMP strategy writes DCP folders under a temporary name, so a crash or a full disk
    leaves the previous ``last.ckpt`` intact."""

    def __init__(self, dirpath: str, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"checkpoint.every_n_steps must be >= 1, got {every_n_steps}")
        self.path = str(Path(dirpath) / LAST)
        self.every_n_steps = every_n_steps

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimisers, loops, RNG

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and batch_idx + 1 != trainer.num_training_batches:
            self._save(trainer)  # (the epoch's last batch: on_train_epoch_end saves the newer state)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM: Lightning lets the running step finish, then raises :class:`SIGTERMException` between
        steps (every rank together under DDP); the state there is saved as ``last.ckpt``."""
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer)


@contextlib.contextmanager
def exit_on_sigterm(logger, is_zero: bool) -> Iterator[None]:
    """Around ``trainer.fit`` / ``trainer.test``: on SIGTERM (what schedulers and ``kubectl delete`` send) Lightning
    finishes the running step and raises :class:`SIGTERMException` (a ``SystemExit`` with status 0), and
    :class:`PeriodicCheckpoint` writes ``last.ckpt``. Here the MLflow run is marked KILLED, one line says how to
    resume, and the process exits with 143 (128 + SIGTERM), so a scheduler sees an interrupted job."""
    try:
        yield
    except SIGTERMException:
        if is_zero:
            logger.experiment.set_terminated(logger.run_id, "KILLED")
            print(
                f"stopped by SIGTERM; the state is in last.ckpt: rerun the same command with resume=auto "
                f"(or resume={logger.run_id}) to continue MLflow run {logger.run_id}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + signal.SIGTERM) from None


def check_checkpoint(path: str, module, sharded: bool = False) -> None:
    """Fail early, with the file named, on a truncated file or a checkpoint of another model.

    Sharded (DCP folder) checkpoints are checked by the strategy when it loads them; a folder is refused
    where training is not sharded (``sharded=False``), as only ``trainer=dmp`` reads one.
    """
    from recsys.safe_load import load_tensors, shape_mismatch

    if Path(path).is_dir():
        if not sharded:
            inside = sorted(p.name for p in Path(path).glob("*.ckpt") if p.is_file())
            hint = f"; give a file, e.g. resume={Path(path) / inside[0]}" if inside else "; give a .ckpt file"
            raise CheckpointError(
                f"resume={path}: a folder is a sharded (DCP) checkpoint, which only trainer=dmp reads{hint}"
            )
        return
    try:
        state = load_tensors(path)  # weights_only=True; a one-line reason when refused
    except Exception as err:  # truncated zip, not a torch file, unsafe pickle
        raise CheckpointError(f"resume={path}: cannot read the checkpoint (truncated or corrupt?): {err}") from err
    saved = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"resume={path}: not a training checkpoint (no state_dict)")
    mismatch = shape_mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()}, saved)
    if mismatch:
        raise CheckpointError(f"resume={path}: the checkpoint belongs to another model ({mismatch})")
