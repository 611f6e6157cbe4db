"""Training that survives faults: determinism, SIGKILL mid-epoch + resume=auto, failed checkpoint writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.test_train_e2e import TINY

SMALL = [
    "data.source.generator.num_users=120",
    "data.source.generator.num_items=300",
    "data.source.generator.num_categories=12",
    "recsys=twin",
    "checkpoint.every_n_steps=2",
    "trainer.max_epochs=2",
]


def _cmd(root: Path, *extra):
    return [sys.executable, "-m", "pipelines.train", f"paths.root_dir={root}", *TINY, *SMALL, *extra]


def _env(root: Path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "PYTHONUNBUFFERED": "1"}


def _metrics(root: Path) -> dict:
    files = sorted((root / "logs" / "train" / "runs").glob("*/metrics.json"))
    return json.loads(files[-1].read_text())


def _run(root: Path, *extra):
    proc = subprocess.run(_cmd(root, *extra), cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.e2e
@pytest.mark.slow
def test_same_seed_same_metrics_and_sigkill_resume(tmp_path):
    first, second, killed = tmp_path / "a", tmp_path / "b", tmp_path / "k"
    _run(first)
    _run(second)
    a, b = _metrics(first), _metrics(second)
    for key in ("val/auc", "test/auc", "test/logloss", "train/loss_epoch"):
        assert a[key] == b[key], key  # bitwise identical on CPU

    proc = subprocess.Popen(
        _cmd(killed), cwd=REPO, env=_env(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((killed / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = next((killed / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] < 2 * 23  # killed before the end (2 epochs x 23 batches; one step = one batch)

    _run(killed, "resume=auto")
    c = _metrics(killed)
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert abs(c[key] - a[key]) <= 1e-6, (key, c[key], a[key])
    client = MlflowClient(tracking_uri=f"sqlite:///{killed}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # resumed into the same run
    assert runs[0].data.metrics["test/auc"] == pytest.approx(a["test/auc"], abs=1e-6)


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_auto_without_an_unfinished_run_starts_fresh(tmp_path):
    _run(tmp_path, "resume=auto", "trainer.max_epochs=1")
    assert "test/auc" in _metrics(tmp_path)


@pytest.mark.e2e
def test_resume_from_a_missing_path_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        _cmd(tmp_path, f"resume={tmp_path}/nope.ckpt"),
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """The project's periodic ``last.ckpt`` (PeriodicCheckpoint -> trainer.save_checkpoint, the unsharded path):
    a disk-full error half-way through a write leaves the previous checkpoint readable and unchanged."""
    import pytorch_lightning as pl
    from fsspec.implementations.local import LocalFileOpener

    from recsys.tracking.resume import PeriodicCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    periodic = PeriodicCheckpoint(str(tmp_path), every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[periodic],
        logger=False,
        enable_checkpointing=True,  # PeriodicCheckpoint is a Checkpoint: Lightning adds no default ModelCheckpoint
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer.fit(Tiny(), data)
    path = Path(periodic.path)
    before = path.read_bytes()
    assert torch.load(path, weights_only=True)["global_step"] == 2

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalFileOpener, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        periodic.on_train_batch_end(trainer, trainer.lightning_module, None, None, 0)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt") == ["last.ckpt"]


@pytest.mark.e2e
@pytest.mark.slow
def test_one_last_checkpoint_with_the_newest_state(tmp_path):
    """23 batches per epoch, a periodic save every 5 steps: the last periodic save (step 20) must not be what
    resume reads; the epoch end (step 23) overwrites the same file, and no second "last" file exists."""
    _run(tmp_path, "trainer.max_epochs=1", "checkpoint.every_n_steps=5")
    folder = next((tmp_path / "logs" / "train" / "runs").glob("*/checkpoints"))
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(folder / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == best["global_step"] > 20  # the epoch end, not the periodic save at step 20


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_saves_marks_killed_exits_nonzero_and_resumes(tmp_path):
    """SIGTERM (a scheduler's stop) mid-epoch: the step finishes, last.ckpt is written after the signal, the MLflow
    run is KILLED, the exit status is 143 with one line on how to resume; resume=auto then ends where an
    uninterrupted run ends."""
    plain, stopped = tmp_path / "plain", tmp_path / "stopped"
    proc = subprocess.Popen(
        _cmd(stopped, "trainer.max_epochs=1"),
        cwd=REPO,
        env=_env(stopped),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = stopped / "logs" / "train" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(runs.glob("*/checkpoints/last.ckpt")):
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be stopped"
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    hint = [line for line in stderr.splitlines() if "SIGTERM" in line and "resume=auto" in line]
    assert len(hint) == 1 and "Traceback" not in stderr, stderr[-3000:]
    last = next(runs.glob("*/checkpoints/last.ckpt"))
    assert last.stat().st_mtime >= signalled - 0.05  # written at the signal, not the periodic save before it
    progress = torch.load(last, map_location="cpu", weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["total"]["completed"] == progress["total"]["processed"] < 23  # a whole step, mid-epoch
    client = MlflowClient(tracking_uri=f"sqlite:///{stopped}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert run.info.status == "KILLED" and run.info.run_id in hint[0]

    _run(stopped, "trainer.max_epochs=1", "resume=auto")
    _run(plain, "trainer.max_epochs=1")
    resumed, expected = _metrics(stopped), _metrics(plain)
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert abs(resumed[key] - expected[key]) <= 1e-6, (key, resumed[key], expected[key])
    (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert run.info.status == "FINISHED"


def test_resume_from_a_folder_without_sharding_is_one_line(tmp_path):
    from recsys.errors import CheckpointError
    from recsys.tracking.resume import check_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(str(folder), torch.nn.Linear(1, 1))
    assert str(err.value) == (
        f"resume={folder}: a folder is a sharded (DCP) checkpoint, which only trainer=dmp reads; "
        f"give a file, e.g. resume={folder / 'last.ckpt'}"
    )
    check_checkpoint(str(folder), torch.nn.Linear(1, 1), sharded=True)  # trainer=dmp: the strategy reads it
