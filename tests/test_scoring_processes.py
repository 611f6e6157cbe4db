"""``processes=N`` (engine=local): files scored by worker processes, each with its own copy of the model. Outputs
equal the one-process job's; a file that fails stops the job with its name and leaves no partial output; a driver
killed outright takes its workers with it; the settings' checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest

from pipelines.score import run
from recsys.data.schema import DataValidationError
from recsys.errors import BundleError, ConfigError
from tests.test_scoring import REPO, assert_same_scores, make_bundle, score_cfg


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory)


@pytest.mark.e2e  # worker processes (the unit loop runs no multi-process job)
def test_two_processes_equal_one(bundle_dir, tmp_path):
    run(score_cfg(bundle_dir, tmp_path / "one"))
    run(score_cfg(bundle_dir, tmp_path / "two", processes=2))
    first, summary = assert_same_scores(tmp_path / "one", tmp_path / "two", 3)
    assert summary["rows_in"] == summary["rows_scored"]
    assert summary["last_run"]["processes"] == 2 and summary["last_run"]["threads"] == 1
    assert summary["last_run"]["pinned_peak_mb"] is None is first["last_run"]["pinned_peak_mb"]  # no CUDA here
    # the driver's own RSS plus two workers that each loaded torch and the model
    assert summary["last_run"]["peak_rss_mb"] > first["last_run"]["peak_rss_mb"] + 100


def _corrupt_pages(path: Path) -> None:
    """Overwrite the middle of the file (its compressed data pages), keeping the footer readable."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(4, len(data) - footer - 4):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))


@pytest.mark.e2e  # worker processes (the unit loop runs no multi-process job)
def test_a_file_that_fails_in_a_worker_stops_the_job_with_its_name(bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for log in sorted((bundle_dir / "logs").glob("*.parquet")):
        (inputs / log.name).write_bytes(log.read_bytes())
    bad = sorted(inputs.glob("*.parquet"))[1]
    _corrupt_pages(bad)
    with pytest.raises(DataValidationError, match=bad.name):
        run(score_cfg(bundle_dir, tmp_path / "out", inputs=inputs, processes=2))
    out = tmp_path / "out"
    assert not (out / bad.name).exists()  # nothing of the failed file is visible
    assert not list(out.glob(".*.tmp"))  # no temp left behind
    for done in out.glob("part-*.parquet"):  # what finished is complete (the rename came last)
        assert pl.read_parquet(done).height > 0


@pytest.mark.e2e  # worker processes (the unit loop runs no multi-process job)
def test_a_bundle_that_fails_its_check_in_the_workers_stops_with_that_line(bundle_dir, tmp_path):
    """The workers load the model (the driver does not): a damaged weights file reaches the user as the
    BundleError a one-process job gives, not as a broken process pool."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir / "model", copy / "model")
    weights = copy / "model" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = score_cfg(bundle_dir, tmp_path / "out", processes=2)
    cfg.model = str(copy)
    with pytest.raises(BundleError) as err:
        run(cfg)
    message = str(err.value)
    assert message.startswith(f"{weights}: sha256 ") and "differs from" in message and "\n" not in message
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"processes": 0}, "processes=0: must be an integer >= 1"),
        ({"processes": 2, "file_workers": 3}, "processes=2 with file_workers=3: worker processes score one file"),
        ({"processes": 2, "engine": "ray"}, "processes=2: engine=local only (engine=ray has its own workers"),
    ],
)
def test_bad_process_settings_stop_with_one_line(bundle_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        run(score_cfg(bundle_dir, tmp_path / "out", **extra))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e  # worker processes (the unit loop runs no multi-process job)
def test_a_killed_driver_takes_its_workers_with_it(bundle_dir, tmp_path):
    """SIGKILL to `python -m pipelines.score ... processes=2` while its workers run: they exit too, and the rerun
    of the same command completes the job."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = pl.concat([pl.read_parquet(p) for p in sorted((bundle_dir / "logs").glob("*.parquet"))])
    for i in range(6):  # enough batches that the workers are still scoring when the driver dies
        pl.concat([source] * 40).write_parquet(inputs / f"part-{i:04d}.parquet")
    command = [
        sys.executable,
        "-m",
        "pipelines.score",
        f"input={inputs}",
        f"model={bundle_dir}",
        f"output={tmp_path / 'out'}",
        "batch_size=20",
        "threads=1",
        "processes=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [c for c in psutil.Process(driver.pid).children() if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert len(workers) == 2, "the workers did not start"
        while time.monotonic() < deadline and not any((tmp_path / "out").glob(".*.tmp")):
            time.sleep(0.2)  # until a worker writes (a temp file): both have loaded the model
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived their driver: {[p.pid for p in alive]}"
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["files_done"] == 6 and summary["rows_in"] == source.height * 40 * 6


@pytest.mark.gpu
def test_processes_on_cuda_equal_the_cpu_job(bundle_dir, tmp_path):
    """Two worker processes, each with its model on the GPU (fixed-shape batches, ids mapped there)."""
    run(score_cfg(bundle_dir, tmp_path / "cpu"))
    run(score_cfg(bundle_dir, tmp_path / "cuda", device="cuda", processes=2))
    last = json.loads((tmp_path / "cuda" / "_summary.json").read_text())["last_run"]
    assert last["processes"] == 2 and last["fixed_shape"] is True and last["pinned_peak_mb"] > 0
    for path in sorted((tmp_path / "cpu").glob("part-*.parquet")):
        cpu, cuda = pl.read_parquet(path), pl.read_parquet(tmp_path / "cuda" / path.name)
        assert cpu.drop("score_click").equals(cuda.drop("score_click"))
        assert np.abs(cuda["score_click"].to_numpy() - cpu["score_click"].to_numpy()).max() < 1e-5
