"""`python -m pipelines.train` end to end on tiny synthetic data, tracked in a tmp sqlite MLflow store."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY_SYNTHETIC = [
    "data.source.generator.num_users=48",
    "data.source.generator.num_items=300",
    "data.source.generator.num_categories=12",
]
TINY = [
    "data.batch_size=256",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run_train(tmp_path, *overrides, check=True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipelines.train", f"paths.root_dir={tmp_path}", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_dare_logs_a_complete_mlflow_run(tmp_path):
    run_train(tmp_path, "recsys=dare", "recsys.attention_dim=8", *TINY_SYNTHETIC)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name.startswith("dare-synthetic-") and run.info.status == "FINISHED"
    assert run.data.params["recsys.attention_dim"] == "8"
    assert run.data.params["recsys.decoupled"] == "True"
    assert not [k for k in run.data.params if k.startswith("paths.") or k.endswith(("_dir", ".path"))]
    assert run.data.tags["path.paths.root_dir"] == str(tmp_path) and "group_hash" in run.data.tags
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(run.data.tags["data_fingerprint"]) == 16
    assert run.data.tags["jagged_kernels"] == "fbgemm"
    assert run.data.tags["version.fbgemm_dist"] == "fbgemm-gpu-cpu" and run.data.tags["version.torchrec"] != "none"
    metrics = run.data.metrics
    for key in (
        "val/auc",
        "test/auc",
        "test/logloss",
        "test/gauc_user",
        "test/click/gauc_category",
        "train/loss_epoch",
    ):
        assert key in metrics, key
    assert metrics["test/auc"] > 0.55, metrics["test/auc"]  # planted signal is learnable even when tiny
    history = client.get_metric_history(run.info.run_id, "val/auc")
    assert len(history) == 2  # one point per epoch
    artifacts = {a.path for d in ("config", "plots", "checkpoints") for a in client.list_artifacts(run.info.run_id, d)}
    assert {
        "config/config.yaml",
        "config/dataset_meta.json",
        "plots/training_curves.png",
        "checkpoints/best.ckpt",
    } <= artifacts
    # the local checkpoint loads safely
    ckpts = list((tmp_path / "logs").rglob("best.ckpt"))
    import torch

    state = torch.load(ckpts[0], weights_only=True)
    assert any(k.startswith("model.backbone.att_tokens") for k in state["state_dict"])


def test_bad_data_path_gives_one_clear_line(tmp_path):
    proc = run_train(tmp_path, "data=ml100k", f"data.path={tmp_path}/nowhere", check=False)
    assert proc.returncode == 2
    assert "error: InputNotFound" in proc.stderr and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
