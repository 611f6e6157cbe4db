"""Hyper-parameter search (Optuna sweeper): the search configs, the budget a rerun resumes, the sweep's MLflow
parent run with the best trial, and a 2-trial toy search end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipelines.train import objective_value
from recsys.errors import ConfigError
from recsys.tracking.optuna_study import best_trial, optuna_direction, record_fixed_overrides, resume_study
from recsys.tracking.sweep import OVERRIDES_TAG, best_child
from tests.conftest import REPO
from tests.test_train_e2e import TINY, TINY_SYNTHETIC

CENSUS_TOWERS = ("mmoe", "ple", "shared_bottom", "switch", "taskexpert")
SEARCHES = ("dare", "sasrec", "mqsa_ted", *CENSUS_TOWERS)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_space_names_keys_of_its_model(search):
    cfg = _compose([f"hparams_search={search}", "paths.root_dir=/tmp/x"])
    assert cfg.recsys._target_ and cfg.objective.sparse_optimizer.lr == cfg.objective.dense_optimizer.lr
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.recsys_optuna.sweeper.BudgetedOptunaSweeper"
    assert sweeper.study_name == f"{search}-{cfg.data.name}" and sweeper.storage == "sqlite:////tmp/x/logs/optuna.db"
    assert sweeper.direction == cfg.checkpoint.mode == "max"
    assert cfg.hydra.runtime.choices["recsys"] == ("fields" if search in CENSUS_TOWERS else search)
    for key in sweeper.params:  # a typo in a searched key would only fail at the first trial
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", (search, key)
    # one learning rate for both optimisers: the sparse one follows the searched dense one
    tuned = _compose([f"hparams_search={search}", "objective.dense_optimizer.lr=0.0042"])
    assert tuned.objective.sparse_optimizer.lr == 0.0042


def test_the_search_files_are_exactly_the_tested_ones():
    assert {p.stem for p in (REPO / "configs" / "hparams_search").glob("*.yaml")} == set(SEARCHES)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_search_file_composes_from_the_command_line(tmp_path):
    """``python -m pipelines.train hparams_search=<name> --cfg job`` as a user types it (every file is composed
    in-process by test_every_search_space_names_keys_of_its_model; the command-line path is the same for all)."""
    cmd = [sys.executable, "-m", "pipelines.train", "hparams_search=mmoe", "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = OmegaConf.create(proc.stdout)
    assert job.recsys._target_ and job.objective.sparse_optimizer.lr == job.objective.dense_optimizer.lr


def _bounds(spec: str) -> list:
    """``choice(a, b, ...)`` -> the values; ``interval(lo, hi)`` -> [lo, hi] (the tower knobs: plain numbers)."""
    inner = spec[spec.rindex("(") + 1 : spec.index(")")]
    return [yaml.safe_load(v) for v in inner.split(",")]


@pytest.mark.parametrize("tower", CENSUS_TOWERS)
def test_census_search_trains_with_early_stopping_and_its_extremes_build(tower):
    """The census tower searches: fields backbone, their tower, early stopping on the validation objective,
    no test pass; the smallest and the largest value of every searched knob build the tower."""
    from hydra.utils import instantiate

    from mtl.spec import TaskSpec

    cfg = _compose([f"hparams_search={tower}", "paths.root_dir=/tmp/x"])
    assert cfg.hydra.runtime.choices["mtl"] == tower and cfg.data.name == "census"
    stop = cfg.callbacks.early_stopping
    assert stop.monitor == cfg.checkpoint.monitor == "val/auc" and stop.mode == "max" and stop.patience >= 2
    assert cfg.test_after_fit is False and cfg.trainer.max_epochs >= 10
    params = cfg.hydra.sweeper.params
    assert {"data.source.dense_pwl", "recsys.embedding_dim", "objective.dense_optimizer.lr"} <= set(params)
    tasks = [TaskSpec("income"), TaskSpec("marital", label="never_married")]
    for pick in (min, max):
        fixed = [f"{k}={pick(_bounds(v))}" for k, v in params.items() if k.startswith("mtl.")]
        tuned = _compose([f"hparams_search={tower}", *fixed])
        out = instantiate(tuned.mtl)(in_dim=24, tasks=tasks)(torch.randn(5, 24))
        assert set(out.logits) == {"income", "marital"}, fixed


def test_direction_follows_checkpoint_mode():
    assert optuna_direction("max") == "maximize" and optuna_direction("min") == "minimize"
    assert optuna_direction(["max", "minimize"]) == ["maximize", "minimize"]
    with pytest.raises(ConfigError, match="'up'"):
        optuna_direction("up")


def test_objective_is_the_best_validation_value_not_the_last():
    cfg = OmegaConf.create({"checkpoint": {"monitor": "val/auc"}})
    assert objective_value(cfg, {"val/auc": 0.61, "best/val/auc": 0.70}) == 0.70
    assert objective_value(cfg, {"val/auc": 0.61}) == 0.61


def test_budget_counts_finished_trials_and_fails_the_stale_ones(tmp_path):
    storage, name = f"sqlite:///{tmp_path}/sub/optuna.db", "s"
    assert resume_study(storage, name, 5).remaining == 5  # no study yet (and the folder is created)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    study.ask()  # a trial a killed sweep left running
    resume = resume_study(storage, name, 3)
    assert (resume.existing, resume.finished, resume.remaining, resume.stale) == (3, 2, 1, 1)
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
    assert resume_study(storage, name, 2).remaining == 0  # never beyond the budget
    best = best_trial(storage, name)
    assert best.value == max(t.value for t in study.trials[:2]) and best.finished == 2
    assert best.overrides == [f"x={best.params['x']}"]


def test_best_trial_reproduces_the_overrides_the_sweep_fixed(tmp_path):
    storage, name = f"sqlite:///{tmp_path}/optuna.db", "s"
    args = ["hparams_search=ple", "mtl.num_levels=1", "hydra.sweeper.n_trials=8", "mtl.dropout=0.0", "lr=choice(1,2)"]
    record_fixed_overrides(storage, name, ["maximize"], args)
    study = optuna.load_study(study_name=name, storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    best = best_trial(storage, name)
    assert best.overrides == ["mtl.num_levels=1", "mtl.dropout=0.0", f"x={best.params['x']}"]
    record_fixed_overrides(storage, name, ["maximize"], [*args, "hydra.sweeper.n_trials=9"])  # a resume: same fixed
    with pytest.raises(ConfigError, match=r"mtl.num_levels=2"):  # another setting would mix two studies in one
        record_fixed_overrides(storage, name, ["maximize"], ["mtl.num_levels=2", "mtl.dropout=0.0"])
    assert best_trial(storage, name).overrides == best.overrides


def test_best_child_is_found_by_its_overrides():
    def run(overrides):
        return type("R", (), {"data": type("D", (), {"tags": {OVERRIDES_TAG: json.dumps(overrides)}})})()

    a, b = run(["lr=0.1", "k=2", "seed=0"]), run(["lr=0.2", "k=2", "seed=0"])
    assert best_child([a, b], ["lr=0.2", "k=2"]) is b
    assert best_child([a, b], ["lr=0.3"]) is None


@pytest.mark.e2e
@pytest.mark.slow
def test_two_trial_search_nests_trials_records_the_best_and_resumes(tmp_path):
    """A toy DARE search: budget 1, then the same study with budget 2 twice (the 2nd run resumes: one more
    trial; the 3rd has nothing left to run)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def search(n_trials):
        cmd = [sys.executable, "-m", "pipelines.train", "-m", "hydra/sweeper=optuna", "hparams_search=dare"]
        cmd += [f"paths.root_dir={tmp_path}", *TINY, *TINY_SYNTHETIC, "trainer.max_epochs=1", "test_after_fit=false"]
        cmd += ["trainer.limit_train_batches=3", f"hydra.sweeper.n_trials={n_trials}"]
        env = {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return optuna.load_study(study_name="dare-synthetic", storage=f"sqlite:///{tmp_path}/logs/optuna.db")

    first = search(1)
    assert len(first.trials) == 1
    fixed = first.user_attrs["fixed_overrides"]  # what the search trained with, for a rerun of its best trial
    assert "trainer.max_epochs=1" in fixed and not any(o.startswith(("hydra", "hparams_search")) for o in fixed)
    study = search(2)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].params != study.trials[1].params  # the resumed sampler drew a new point
    assert len(search(2).trials) == 2  # the budget is reached: nothing beyond it

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(parents) == 1, "one parent per study, reopened by each rerun"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    best = study.best_trial
    assert parent.data.metrics["optuna/best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["optuna/trials"] == 2
    assert json.loads(parent.data.tags["optuna/best_params"]) == best.params
    assert parent.data.tags["optuna/best_trial"] == str(best.number)
    best_run = client.get_run(parent.data.tags["optuna/best_run_id"])
    assert best_run.data.metrics["val/auc"] == pytest.approx(best.value)  # 1 epoch: best = last
    for name, value in best.params.items():
        assert best_run.data.params[name] == str(value)
    assert "best_trial/config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "best_trial")}
