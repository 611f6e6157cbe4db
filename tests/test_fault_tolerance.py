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


def test_resume_auto_without_an_unfinished_run_starts_fresh(tmp_path):
    _run(tmp_path, "resume=auto", "trainer.max_epochs=1")
    assert "test/auc" in _metrics(tmp_path)


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


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """Lightning's checkpoint writes (what trainer.save_checkpoint uses unsharded) go through a temporary
    file: a disk-full error half-way leaves the previous checkpoint readable and unchanged."""
    from fsspec.implementations.local import LocalFileOpener
    from lightning_fabric.utilities.cloud_io import _atomic_save

    path = tmp_path / "last.ckpt"
    _atomic_save({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalFileOpener, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _atomic_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1
