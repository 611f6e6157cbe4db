"""The ``processes`` Hydra launcher (hydra_plugins/recsys_launcher): its config, the overrides and return value a
job gets, then sweeps of a few-line Hydra app (tests/sweep_app.py: seconds) for jobs at once, failed jobs and a
stopped sweep, and a 2-trial toy search of pipelines.train with 2 jobs at once (MLflow children, Optuna values)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from hydra_plugins.recsys_launcher.launcher import ProcessLauncher, hydra_quote, job_hydra_overrides
from recsys.errors import ConfigError
from recsys.tracking.job_return import RETURN_ENV, publish_return_value, read_return_value
from tests.conftest import REPO
from tests.test_train_e2e import TINY, TINY_SYNTHETIC

SEARCHES = sorted(p.stem for p in (REPO / "configs" / "hparams_search").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_n_jobs_below_one_is_a_config_error_naming_the_key():
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=rf"^hydra.launcher.n_jobs: {bad} is not allowed; give an integer >= 1"):
            ProcessLauncher(n_jobs=bad)
    cfg = _compose(["hydra/launcher=processes", "hydra.launcher.n_jobs=0"])  # the way Hydra builds it
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.hydra.launcher)
    assert isinstance(err.value.__cause__, ConfigError) and "\n" not in str(err.value.__cause__)
    assert instantiate(_compose(["hydra/launcher=processes", "hydra.launcher.n_jobs=3"]).hydra.launcher).n_jobs == 3


@pytest.mark.parametrize("search", SEARCHES)
def test_a_search_asks_as_many_trials_per_batch_as_the_launcher_runs_at_once(search):
    assert _compose([f"hparams_search={search}"]).hydra.sweeper.n_jobs == 1  # basic launcher: one at a time
    cfg = _compose([f"hparams_search={search}", "hydra/launcher=processes", "hydra.launcher.n_jobs=8"])
    assert cfg.hydra.sweeper.n_jobs == 8 and cfg.hydra.launcher.n_jobs == 8
    fixed = _compose([f"hparams_search={search}", "hydra/launcher=processes", "hydra.sweeper.n_jobs=2"])
    assert fixed.hydra.sweeper.n_jobs == 2  # still settable on its own


def test_a_job_gets_the_sweeps_hydra_overrides_but_not_how_the_multirun_runs():
    sweep = ["hydra.mode=MULTIRUN", "hydra/launcher=processes", "hydra.launcher.n_jobs=2", "hydra/sweeper=optuna"]
    sweep += ["+hydra.sweeper.x=1", "hydra.sweeper.n_trials=3", "hydra.run.dir=/x", "hydra.job.chdir=true"]
    sweep += ["hydra/job_logging=disabled", "hydra.sweep.dir=/s"]
    assert job_hydra_overrides(sweep) == ["hydra.job.chdir=true", "hydra/job_logging=disabled", "hydra.sweep.dir=/s"]
    for path in ("/tmp/a b,c/it's\\x/0", "/tmp/q\\'s", "/tmp/end\\\\", "/tmp/plain"):
        parsed = OverridesParser.create().parse_overrides([f"hydra.run.dir={hydra_quote(path)}"])[0]
        assert parsed.value() == path and not parsed.is_sweep_override(), path


def test_return_value_goes_through_the_file_only_when_asked(tmp_path, monkeypatch):
    target = tmp_path / "job" / "job_return.json"
    monkeypatch.delenv(RETURN_ENV, raising=False)
    assert publish_return_value(0.5) == 0.5 and not target.parent.exists()
    monkeypatch.setenv(RETURN_ENV, str(target))
    assert publish_return_value(0.25) == 0.25 and read_return_value(target) == 0.25
    publish_return_value(float("nan"))  # a run that never logged its monitor: NaN, as in process
    assert math.isnan(read_return_value(target)) and not list(target.parent.glob("*.tmp"))


APP = [sys.executable, "-m", "tests.sweep_app", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid"]
APP += ["hydra.sweeper._target_=hydra_plugins.recsys_optuna.sweeper.BudgetedOptunaSweeper"]
APP += ["hydra.sweeper.direction=max", "hydra.sweeper.study_name=app", "hydra/launcher=processes"]


def _app_sweep(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    cmd = [*APP, f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", f"hydra.sweep.dir={tmp_path}/sweep"]
    cmd += [f"marks={tmp_path}/marks", *overrides]
    with open(tmp_path / "sweep.log", "w") as log:  # the process keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def _trials(tmp_path: Path) -> dict[int, tuple[str, float | None]]:
    study = optuna.load_study(study_name="app", storage=f"sqlite:///{tmp_path}/optuna.db")
    return {t.params["x"]: (t.state.name, t.value) for t in study.trials}


@pytest.mark.e2e
def test_jobs_run_n_at_once_in_the_basic_launchers_folders_and_a_failed_job_is_a_failed_trial(tmp_path):
    batches = ["hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=5", "hydra.launcher.n_jobs=2"]  # one batch of 5
    failing = ["hydra.sweeper.max_failure_rate=0.5", "fail_at=3"]
    proc = _app_sweep(tmp_path, "x=choice(1,2,3,4,5)", *batches, *failing, "sleep_s=1.5")
    assert proc.wait(timeout=120) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    trials = _trials(tmp_path)
    assert trials == {x: ("FAIL", None) if x == 3 else ("COMPLETE", 10.0 * x) for x in range(1, 6)}
    log = (tmp_path / "sweep.log").read_text()
    assert "job #" in log and "sweep_app: x=3 fails on purpose" in log  # the failed job's stderr, in the sweep's log
    marks = tmp_path / "marks"
    spans = []
    for x in (1, 2, 4, 5):
        spans.append((float((marks / f"{x}.start").read_text().split()[1]), float((marks / f"{x}.end").read_text())))
    at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert at_once == 2, spans  # the launcher runs two of the batch at a time, never three
    for num in range(5):  # ${hydra.sweep.dir}/${hydra.sweep.subdir}: what the basic launcher would use
        folder = tmp_path / "sweep" / str(num)
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        x = int(next(o for o in overrides if o.startswith("x="))[2:])
        assert yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"] == num
        if x != 3:
            assert read_return_value(folder / "job_return.json") == 10.0 * x


@pytest.mark.e2e
def test_a_trial_starts_as_soon_as_a_slot_frees_not_after_the_slowest_of_a_batch(tmp_path):
    """5 trials, 2 at once, the first job to start sleeps 20 s and the others 0.2 s: the other slot runs the four
    fast ones meanwhile (in batches of 2, one would wait for the slow one), and each trial is told as it ends."""
    slots = ["hydra.sweeper.n_trials=5", "hydra.launcher.n_jobs=2", "slow_first=true", "slow_s=20", "sleep_s=0.2"]
    proc = _app_sweep(tmp_path, "x=choice(1,2,3,4,5)", *slots)
    assert proc.wait(timeout=180) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    assert _trials(tmp_path) == {x: ("COMPLETE", 10.0 * x) for x in range(1, 6)}
    marks = tmp_path / "marks"
    spans = {
        x: (float((marks / f"{x}.start").read_text().split()[1]), float((marks / f"{x}.end").read_text()))
        for x in range(1, 6)
    }
    slow = max(spans, key=lambda x: spans[x][1] - spans[x][0])
    inside = [x for x, (s, e) in spans.items() if x != slow and spans[slow][0] <= s and e <= spans[slow][1]]
    assert len(inside) == 4, spans  # all four fast trials ran while the slow one did
    assert "each as a slot frees" in (tmp_path / "sweep.log").read_text()
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()


@pytest.mark.e2e
def test_a_stopped_sweep_stops_its_jobs_and_keeps_the_finished_trials(tmp_path):
    batch = ["hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra.launcher.n_jobs=2"]
    proc = _app_sweep(tmp_path, "x=choice(1,2)", *batch, "slow_from=2")
    marks = tmp_path / "marks"
    deadline = time.monotonic() + 120
    while not ((marks / "1.end").exists() and (marks / "2.start").exists()) and time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # the launcher notices job 1's exit
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert (marks / "2.term").exists()  # the running job got SIGTERM (pipelines.train saves last.ckpt on it)
    pid = int((marks / "2.start").read_text().split()[0])
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert _trials(tmp_path) == {1: ("COMPLETE", 10.0), 2: ("FAIL", None)}  # a resumed study re-runs the failed one


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sweep_killed_outright_leaves_no_job_running(tmp_path):
    proc = _app_sweep(tmp_path, "x=choice(1)", "hydra.sweeper.n_trials=1", "hydra.launcher.n_jobs=1", "slow_from=1")
    marks = tmp_path / "marks"
    deadline = time.monotonic() + 120
    while not (marks / "1.start").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(0.2)
    proc.kill()  # SIGKILL: the sweep cannot stop its jobs itself
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not (marks / "1.term").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (marks / "1.term").exists()  # the job got SIGTERM when its sweep died (it would sleep 60 s otherwise)


@pytest.mark.e2e
def test_n_jobs_below_one_stops_the_sweep_before_any_job(tmp_path):
    proc = _app_sweep(tmp_path, "x=choice(1,2)", "hydra.sweeper.n_trials=2", "hydra.launcher.n_jobs=0")
    assert proc.wait(timeout=60) != 0
    assert (
        "ConfigError('hydra.launcher.n_jobs: 0 is not allowed; give an integer >= 1"
        in (tmp_path / "sweep.log").read_text()
    )
    assert not (tmp_path / "marks").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_two_trials_at_once_of_a_toy_search_are_children_of_one_parent(tmp_path):
    """A toy DARE search of pipelines.train, 2 trials at once as subprocesses (one per free slot): both COMPLETE with
    the value their own run reports, distinct run folders, one MLflow parent with both runs as children, and no
    sqlite store (MLflow's, Optuna's) ever locked."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "pipelines.train", "-m", "hparams_search=dare", f"paths.root_dir={tmp_path}"]
    cmd += [*TINY, *TINY_SYNTHETIC, "trainer.max_epochs=1", "test_after_fit=false", "trainer.limit_train_batches=3"]
    cmd += ["hydra.sweeper.n_trials=2", "hydra/launcher=processes", "hydra.launcher.n_jobs=2"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "jobs as subprocesses of -m pipelines.train, 2 at once, each as a slot frees" in proc.stderr + proc.stdout

    study = optuna.load_study(study_name="dare-synthetic", storage=f"sqlite:///{tmp_path}/logs/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].params != study.trials[1].params
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    folders = [sweep_dir / "0", sweep_dir / "1"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    by_folder = {r.data.tags["output_dir"]: r for r in children}
    assert set(by_folder) == {str(f) for f in folders}  # each trial in its own folder
    for trial, folder in zip(study.trials, folders):
        reported = json.loads((folder / "metrics.json").read_text())["best/val/auc"]
        assert trial.value == pytest.approx(reported) == read_return_value(folder / "job_return.json")
        run = by_folder[str(folder)]
        assert run.data.metrics["best/val/auc" if "best/val/auc" in run.data.metrics else "val/auc"] == (
            pytest.approx(trial.value)
        )
        tagged = json.loads(run.data.tags["sweep_job_overrides"])  # the parent finds the best trial's run by these
        assert {f"{k}={v}" for k, v in trial.params.items()} <= set(tagged)
        assert not any(o.startswith("hydra") for o in tagged)
    assert parent.data.metrics["optuna/best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["optuna/best_run_id"] in {r.info.run_id for r in children}
    logs = [proc.stderr, proc.stdout, *(p.read_text(errors="replace") for p in sweep_dir.rglob("*.log"))]
    assert not any("database is locked" in text for text in logs)


def test_a_trials_return_value_becomes_its_objective_values_or_a_one_line_error():
    from hydra_plugins.recsys_optuna.streaming import trial_values

    assert trial_values(0.5, 1) == [0.5] and trial_values("0.25", 1) == [0.25]
    assert trial_values([0.5, 2], 2) == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"must be 1 float-castable value\(s\); got 'nan-ish'"):
        trial_values("nan-ish", 1)
    with pytest.raises(ValueError, match=r"return value has 3 values for 2 objectives"):
        trial_values([1, 2, 3], 2)


def test_only_the_grid_samplers_stop_request_is_swallowed_when_a_trial_is_told(tmp_path):
    from hydra_plugins.recsys_optuna.streaming import _tell

    grid = optuna.samplers.GridSampler({"x": [1]})
    study = optuna.create_study(sampler=grid, storage=f"sqlite:///{tmp_path}/s.db")
    trial = study.ask()
    trial.suggest_categorical("x", [1])
    _tell(study, trial, values=[1.0])  # the grid is covered: optuna asks to stop, outside an objective
    assert [t.state.name for t in study.trials] == ["COMPLETE"]

    class Broken:
        def tell(self, *args, **kwargs):
            raise RuntimeError("storage is gone")

    with pytest.raises(RuntimeError, match="storage is gone"):
        _tell(Broken(), trial, values=[1.0])
