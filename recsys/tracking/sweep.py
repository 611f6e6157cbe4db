"""Hydra multirun -> one MLflow parent run holding the sweep's child runs and their mean ± std.

Enabled in ``configs/train.yaml`` under ``hydra.callbacks``. ``python -m pipelines.train -m seed=1,2,3``
creates the parent run first, every job tags its run with ``mlflow.parentRunId`` (the MLflow UI nests
it), and at the end the parent gets ``<metric>/mean`` and ``<metric>/std`` for every ``test/*`` metric over
the children that differ only in the seed; a sweep over other keys (``recsys=din,dare``) gets one such pair
per config group, prefixed ``<recsys>-<group hash>/`` (:func:`group_children`).

With the Optuna sweeper (``hydra/sweeper=optuna``, :mod:`recsys.tracking.optuna_study`) there is one parent
per study (tags ``optuna_study``, ``optuna_storage``): a rerun that resumes the study reopens it, so every trial
of the study is its child. At the end the parent records the best trial so far: metrics ``optuna/best_value``
and ``optuna/trials`` (step = complete trials), tags ``optuna/best_trial``, ``optuna/best_params`` (JSON),
``optuna/best_overrides`` and ``optuna/best_run_id`` (tags, not params: a resumed study may change the best),
and the best trial's resolved config as the artifact ``best_trial/config.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from recsys.tracking.mlflow import mark_model_training

log = logging.getLogger(__name__)

PARENT_ENV = "RECSYS_SWEEP_PARENT_RUN_ID"
#: child-run tag: the job's Hydra overrides as a JSON list (set by pipelines.train inside a sweep)
OVERRIDES_TAG = "sweep_job_overrides"


def _client_and_experiment(config: DictConfig):
    from mlflow.tracking import MlflowClient

    from recsys.tracking.mlflow import check_tracking_uri

    logger = OmegaConf.to_container(config.logger, resolve=True)
    check_tracking_uri(logger["tracking_uri"])
    client = MlflowClient(tracking_uri=logger["tracking_uri"])
    name = logger["experiment_name"]
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=logger["artifact_location"])
    mark_model_training(client, exp_id)
    return client, exp_id


def aggregate(values: dict[str, list[float]]) -> dict[str, float]:
    """``{metric: [v1, v2, ...]}`` -> ``{metric/mean: .., metric/std: ..}`` (std 0 for a single run)."""
    out = {}
    for metric, vals in values.items():
        out[f"{metric}/mean"] = statistics.mean(vals)
        out[f"{metric}/std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def group_children(children: list) -> dict[str, list]:
    """Children that differ only in the seed (one ``group_hash`` tag) are one group; averaging runs of different
    configs (``-m recsys=din,dare``) would mix models. -> metric-name prefix -> runs: ``""`` when the sweep
    is one group (``test/auc/mean``), else ``<recsys>-<group hash>/`` per group (``din-1a2b3c4d/test/auc/mean``)."""
    groups: dict[str, list] = {}
    for child in children:
        tags = child.data.tags
        groups.setdefault(f"{tags.get('recsys', 'model')}-{tags.get('group_hash', child.info.run_id)[:8]}/", []).append(
            child
        )
    return {"": children} if len(groups) == 1 else groups


def optuna_study(config: DictConfig) -> tuple[str, str] | None:
    """``(storage, study_name)`` when the multirun's sweeper is an Optuna one with a storage, else None."""
    sweeper = config.hydra.get("sweeper") if "hydra" in config else None
    if not sweeper or "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    return (str(storage), str(name)) if storage and name else None


def best_child(children: list[Any], overrides: list[str]) -> Any | None:
    """The first child run whose Hydra overrides include every ``overrides`` entry."""
    wanted = set(overrides)
    for child in children:
        if wanted <= set(json.loads(child.data.tags.get(OVERRIDES_TAG, "[]"))):
            return child
    return None


class MLflowSweepParent(Callback):
    """Hydra callback: a parent MLflow run per multirun (per study with the Optuna sweeper)."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.study: tuple[str, str] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, exp_id = _client_and_experiment(config)
        overrides = " ".join(config.hydra.overrides.task) if "hydra" in config else ""
        tags = {"sweep_parent": "true", "sweep_overrides": overrides}
        self.study = optuna_study(config)
        if self.study is not None:
            storage, name = self.study
            tags.update(optuna_storage=storage, optuna_study=name)
            found = client.search_runs(
                [exp_id],
                filter_string=f"tags.sweep_parent = 'true' and tags.optuna_study = '{name}' "
                f"and tags.optuna_storage = '{storage}'",
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            if found:  # the study resumes: so does its parent run
                self.parent_id = found[0].info.run_id
                client.update_run(self.parent_id, status="RUNNING")
                os.environ[PARENT_ENV] = self.parent_id
                log.info("MLflow sweep parent run %s (resumed study %s)", self.parent_id, name)
                return
        run = client.create_run(exp_id, run_name=f"sweep-{config.data.name}", tags=tags)
        self.parent_id = run.info.run_id
        os.environ[PARENT_ENV] = self.parent_id
        log.info("MLflow sweep parent run %s", self.parent_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is None:
            return
        client, exp_id = _client_and_experiment(config)
        children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'")
        groups = group_children(children)
        for prefix, members in groups.items():
            values: dict[str, list[float]] = {}
            for child in members:
                for key, value in child.data.metrics.items():
                    if key.startswith("test/"):
                        values.setdefault(key, []).append(value)
            for key, value in aggregate(values).items():
                client.log_metric(self.parent_id, prefix + key, value)
        client.set_tag(
            self.parent_id,
            "sweep_groups",
            "; ".join(f"{p or 'all'}: {len(m)} run(s)" for p, m in groups.items()),
        )
        if self.study is not None:
            self._log_best_trial(client, children)
        else:
            client.log_param(self.parent_id, "children", len(children))
        client.set_terminated(self.parent_id)
        os.environ.pop(PARENT_ENV, None)

    def _log_best_trial(self, client: Any, children: list[Any]) -> None:
        from recsys.tracking.optuna_study import best_trial

        assert self.study is not None and self.parent_id is not None
        best = best_trial(*self.study)
        if best is None:
            return
        client.log_metric(self.parent_id, "optuna/best_value", best.value, step=best.finished)
        client.log_metric(self.parent_id, "optuna/trials", best.finished, step=best.finished)
        client.set_tag(self.parent_id, "optuna/best_trial", str(best.number))
        client.set_tag(self.parent_id, "optuna/best_params", json.dumps(best.params))
        client.set_tag(self.parent_id, "optuna/best_overrides", " ".join(best.overrides))
        run = best_child(children, best.searched)  # the trials of one study differ in these
        if run is None:
            log.warning("best trial %d of study %s: no child run with its overrides", best.number, self.study[1])
            return
        client.set_tag(self.parent_id, "optuna/best_run_id", run.info.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            config = client.download_artifacts(run.info.run_id, "config/config.yaml", tmp)
            client.log_artifact(self.parent_id, str(Path(config)), "best_trial")
