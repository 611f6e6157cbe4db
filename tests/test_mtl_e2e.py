"""`python -m pipelines.train recsys=fields mtl=... data=census` end to end with a tiny budget, and the one-line
error of an incompatible backbone × data pair."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.batch_size=256",
    "data.eval_batch_size=1024",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run_train(tmp_path, *overrides):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "pipelines.train", f"paths.root_dir={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_fields_mmoe_census_logs_a_multitask_run(tmp_path):
    proc = run_train(tmp_path, "recsys=fields", "mtl=mmoe", "data=census", "mtl.num_experts=3", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("census").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name.startswith("fields-mmoe-census-") and run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in (
        "val/auc",
        "val/income/auc",
        "val/marital/logloss",
        "test/income/auc",
        "test/marital/auc",
        "test/auc",
        "train/task/income",
        "train/task/marital",
        "train/loss_epoch",
    ):
        assert key in metrics, (key, sorted(metrics))
    assert 0.5 < metrics["test/income/auc"] <= 1.0
    assert len(client.get_metric_history(run.info.run_id, "val/income/auc")) == 2
    artifacts = {a.path for d in ("plots", "gates") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/gate_usage.png", "plots/training_curves.png", "gates/gate_usage.json"} <= artifacts
    usage = json.loads(next((tmp_path / "logs").rglob("gate_usage.json")).read_text())
    assert len(usage) == 2 and set(usage[-1]["usage"]) == {"gate/income", "gate/marital"}
    assert abs(sum(usage[-1]["usage"]["gate/income"]) - 1.0) < 1e-4


def test_sequence_backbone_on_tabular_data_fails_in_one_line(tmp_path):
    proc = run_train(tmp_path, "recsys=dare", "data=census", *TINY)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: ConfigError: backbone TargetAttentionBackbone cannot be built" in proc.stderr
    assert "Traceback" not in proc.stderr
