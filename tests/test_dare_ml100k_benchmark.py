"""benchmarks/dare_ml100k.py end to end on tiny synthetic data: the paired grid (dims, best epoch, the paired
interval, one MLflow store per parallel run) and its per-run timeout (a file of its own, so the two slow benchmark
files run on different test workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.helpers import TINY_SYNTHETIC as TINY
from tests.helpers import run_benchmark as _benchmark


@pytest.mark.slow
@pytest.mark.e2e
def test_dare_ml100k_records_dim_best_epoch_and_the_paired_interval(tmp_path):
    summary = _benchmark(
        tmp_path, "benchmarks.dare_ml100k", "--data", "synthetic", "--models", "twin", "dare", "--seeds", "1", "2",
        "--dims", "8", "--patience", "1", "--max-epochs", "2", "--batch-size", "256", "--tag", "t", "--parallel", "2",
        *TINY,
    )  # fmt: skip
    runs = [json.loads(line) for line in (tmp_path / "results" / "t_runs.jsonl").open()]
    assert {(r["model"], r["seed"], r["dim"], r["patience"], r["parallel"]) for r in runs} == {
        (m, s, 8, 1, 2) for m in ("twin", "dare") for s in (1, 2)
    }
    assert len({r["mlflow_store"] for r in runs}) == 4  # one sqlite store per parallel run
    assert all(r["device"] == "cpu" and r["seconds"] > 0 for r in runs)
    assert all(1 <= r["best_epoch"] <= r["epochs_run"] <= 2 for r in runs)
    for model in ("twin", "dare"):  # the summary's best epoch: the median over the seeds
        (line,) = [s for s in summary if s.get("model") == model]
        assert line["best_epoch"] == np.median([r["best_epoch"] for r in runs if r["model"] == model])
    (pair,) = [s for s in summary if "paired" in s]
    auc = {(r["model"], r["seed"]): r["auc"] for r in runs}
    assert pair["auc_diff"] == pytest.approx(np.mean([auc["dare", s] - auc["twin", s] for s in (1, 2)]))
    assert pair["ci95"][0] <= pair["auc_diff"] <= pair["ci95"][1]


@pytest.mark.slow
@pytest.mark.e2e
def test_dare_ml100k_run_timeout_stops_runs_and_their_children(tmp_path):
    env = {**os.environ, "RECSYS_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "benchmarks.dare_ml100k", "--results", str(tmp_path / "results"), "--data", "synthetic",
        "--models", "twin", "dare", "--seeds", "1", "--dims", "8", "--parallel", "2", "--run-timeout", "4",
        "--tag", "cut", *TINY,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1  # runs were cut: the summary is still written, the exit status says so
    assert proc.stderr.count("stopped after 4 s (--run-timeout 4.0)") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "results" / "cut_runs.jsonl").exists()
    assert (tmp_path / "results" / "cut.md").exists()
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the cut runs still running: {left}"
