"""Comparing runs: multirun sweeps under a parent run, the compare pipeline, a real MLflow server over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.test_train_e2e import TINY, TINY_SYNTHETIC

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _train(tmp_path, env_uri, *args):
    """One training run as a subprocess whose working directory is a fresh folder under ``tmp_path`` (never the
    repository: a relative artifact path must not land in the checkout)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": env_uri,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "pipelines.train",
        *args,
        f"paths.root_dir={tmp_path}",
        *TINY,
        *TINY_SYNTHETIC,
        "trainer.max_epochs=1",
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_multirun_nests_seeds_under_a_parent_and_compare_reads_them(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _train(tmp_path, uri, "-m", "seed=1,2", "recsys=twin")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["seed"] for r in children) == ["1", "2"]
    aucs = [r.data.metrics["test/auc"] for r in children]
    assert parent.data.metrics["test/auc/mean"] == pytest.approx(sum(aucs) / 2)
    assert parent.data.metrics["test/auc/std"] > 0  # different seeds, different results
    assert all(r.info.run_name.startswith("twin-synthetic-") for r in children)

    out = tmp_path / "compare"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.compare",
            "experiment=synthetic",
            "metric=test/auc",
            f"out={out}",
            f"tracking_uri={uri}",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "synthetic_test_auc.md").read_text()
    assert "| twin | 2 |" in table
    csv_rows = (out / "synthetic_test_auc.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3  # header + two seeds, the parent is left out
    assert (out / "synthetic_test_auc_final.png").stat().st_size > 1000
    assert (out / "synthetic_test_auc_curves.png").stat().st_size > 1000


def test_compare_names_a_missing_experiment(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.compare",
            "experiment=nope",
            f"paths.root_dir={tmp_path}",
            f"tracking_uri=sqlite:///{tmp_path}/empty.db",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "experiment='nope' not found" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_training_against_a_real_mlflow_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.time() < deadline, "mlflow server did not come up"
                time.sleep(1)
        _train(tmp_path, base, "recsys=din", "logger.artifact_location=mlflow-artifacts:/exp")
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=synthetic")["experiment"]
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            method="POST",
            data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as response:
            runs = json.loads(response.read())["runs"]
        assert len(runs) == 1
        data = runs[0]["data"]
        metrics = {m["key"] for m in data["metrics"]}
        params = {p["key"]: p["value"] for p in data["params"]}
        assert {"val/auc", "test/auc"} <= metrics and params["recsys.scorer"] == "din"
        run_id = runs[0]["info"]["run_id"]
        listed = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}")
        assert {"config", "model", "plots", "checkpoints"} <= {f["path"] for f in listed["files"]}
        # the files went through the server into its artifact store, not into a local folder
        stored = {p.relative_to(tmp_path / "art").as_posix() for p in (tmp_path / "art").rglob("*") if p.is_file()}
        for name in ("config/config.yaml", "model/bundle.json", "model/weights.pt", "checkpoints/best.ckpt"):
            assert any(s.endswith(f"{run_id}/artifacts/{name}") for s in stored), (name, sorted(stored)[:20])
        for folder in (tmp_path / "work", REPO):
            assert not list(folder.glob("mlflow-artifacts*")), folder
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_experiment_hash_ignores_the_run_folder_but_not_settings():
    from recsys.tracking.mlflow import experiment_hash

    def config(folder: str, patience: int) -> dict:
        callbacks = {"ckpt": {"dirpath": f"{folder}/checkpoints"}, "stop": {"patience": patience}}
        return {"paths": {"output_dir": folder}, "callbacks": callbacks, "seed": 0}

    assert experiment_hash(config("/runs/a", 3)) == experiment_hash(config("/runs/b", 3))
    assert experiment_hash(config("/runs/a", 3)) != experiment_hash(config("/runs/a", 4))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_a_dead_tracking_server_is_one_line_in_seconds(tmp_path):
    """MLflow alone retries a closed port for minutes and then prints a long traceback."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipelines.train", f"paths.root_dir={tmp_path}", *TINY]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - start < 60
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert f"MLflow tracking server {uri}" in line and "does not answer within 5 s" in line
    assert not (tmp_path / ".cache").exists()  # stopped before any data was prepared
