"""engine=ray on a local Ray instance with 2 CPUs: equal to engine=local, a killed worker's file retried,
a corrupt file among good ones, a killed driver resumed. One Ray instance for the module."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipelines.score import run
from recsys.data.schema import DataValidationError
from tests.conftest import REPO
from tests.test_scoring import _one_log, _score_cli, _synthetic_logs, _write_many, make_bundle, score_cfg

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow
COUNTS = ("files", "files_done", "rows_in", "rows_scored", "rows_rejected", "unseen_ids_mapped", "weights_sha256")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs, joined by the engine (it does not start its own when one is up)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory)


def ray_cfg(bundle_dir, output, inputs, **extra):
    return score_cfg(bundle_dir, output, inputs=inputs, engine="ray", ray={"workers": 2}, **extra)


def _same_outputs(a: Path, b: Path) -> None:
    """Same files, rows and order; scores within float tolerance; identical rejects; identical counts."""
    names = sorted(p.relative_to(a) for p in a.rglob("*.parquet") if not p.name.startswith("."))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.parquet") if not p.name.startswith("."))
    for name in names:
        left, right = pl.read_parquet(a / name), pl.read_parquet(b / name)
        scores = [c for c in left.columns if c.startswith("score_")]
        assert left.drop(scores).equals(right.drop(scores)), name
        for column in scores:
            np.testing.assert_allclose(left[column].to_numpy(), right[column].to_numpy(), rtol=0, atol=1e-6)
    summaries = [json.loads((d / "_summary.json").read_text()) for d in (a, b)]
    assert {k: summaries[0][k] for k in COUNTS} == {k: summaries[1][k] for k in COUNTS}


def test_ray_equals_local_and_a_corrupt_file_fails_alone(ray_local, bundle_dir, tmp_path):
    """Same outputs, rejects and counts as engine=local; a truncated file among good ones fails its own task
    (named in the error, exit code 2 from the CLI), the good files are all scored."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    frame = _one_log(bundle_dir)
    for i in range(5):  # a null item and an unseen category in each file
        frame.with_columns(
            pl.when(pl.int_range(pl.len()) == i).then(None).otherwise(pl.col("item")).alias("item"),
            pl.when(pl.int_range(pl.len()) == i + 1).then(10**12).otherwise(pl.col("category")).alias("category"),
        ).write_parquet(inputs / f"part-{i}.parquet")
    run(score_cfg(bundle_dir, tmp_path / "local", inputs=inputs, unseen="reject"))
    good = (inputs / "part-0.parquet").read_bytes()
    (inputs / "part-1b.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataValidationError, match=r"1 of 6 files failed .*part-1b\.parquet.*cannot read parquet"):
        run(ray_cfg(bundle_dir, tmp_path / "ray", inputs, unseen="reject"))
    summary = json.loads((tmp_path / "ray" / "_summary.json").read_text())
    assert summary["files_done"] == 5 and len(summary["files_failed"]) == 1
    assert "part-1b.parquet" in summary["files_failed"][0]
    assert summary["last_run"]["rows_rejected"] == {"null": 5, "unseen_id": 5}
    assert summary["last_run"]["engine"] == "ray" and summary["last_run"]["workers"] == 2
    assert len(summary["last_run"]["worker_peak_rss_mb"]) == 2  # both workers scored files
    (inputs / "part-1b.parquet").unlink()  # the local job's input set: the counts must match
    summarise_again = run(ray_cfg(bundle_dir, tmp_path / "ray", inputs, unseen="reject"))  # a rerun skips all
    assert summarise_again.rows_in == 0
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def _kill_a_busy_worker(output: Path, killed: list, stop: threading.Event) -> None:
    """Once a temp output exists (a file half-written), SIGKILL the worker process that is scoring."""
    while not stop.is_set():
        if list(output.glob(".*.tmp")):
            for proc in psutil.process_iter(["cmdline"]):
                if " ".join(proc.info["cmdline"] or []).startswith("ray::ScoreWorker.score"):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.01)


def test_killed_worker_file_is_retried_complete(ray_local, bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        _synthetic_logs(bundle_dir, inputs / f"part-{i}.parquet", rows=3000, seq=20)
    run(score_cfg(bundle_dir, tmp_path / "local", inputs=inputs, batch_size=8))
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_a_busy_worker, args=(tmp_path / "ray", killed, stop))
    watcher.start()
    try:
        run(ray_cfg(bundle_dir, tmp_path / "ray", inputs, batch_size=8))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was caught mid-file"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    for path in (tmp_path / "ray").glob("part-*.parquet"):
        assert pq.read_metadata(path).num_rows == 3000


@pytest.mark.e2e
def test_killed_driver_resumes_without_redoing_finished_files(ray_local, bundle_dir, tmp_path):
    """The driver is a subprocess joining the module's Ray (ray.address=<gcs>); SIGKILL it mid-job, rerun."""
    inputs = tmp_path / "in"
    _write_many(bundle_dir, inputs, copies=8)
    run(score_cfg(bundle_dir, tmp_path / "local", inputs=inputs, batch_size=4))
    out = tmp_path / "ray"
    extra = ["engine=ray", f"ray.address={ray_local}", "ray.workers=2"]
    cli = [c if not c.startswith("batch_size=") else "batch_size=4" for c in _score_cli(bundle_dir, inputs, out, extra)]
    proc = subprocess.Popen(cli, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("part-*.parquet"))
    assert 2 <= len(finished) < 8, f"kill should land mid-run: {len(finished)} files, {proc.stderr.read()[-2000:]}"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["last_run"]["files_scored"] == 8 - len(before) and summary["files_done"] == 8
    for name, stamp in before.items():  # finished files were not redone
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, name
    _same_outputs(tmp_path / "local", out)
    assert not list(out.rglob("*.tmp"))
