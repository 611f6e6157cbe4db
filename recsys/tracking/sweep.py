"""Hydra multirun -> one MLflow parent run holding the sweep's child runs and their mean ± std.

Enabled in ``configs/train.yaml`` under ``hydra.callbacks``. ``python -m pipelines.train -m seed=1,2,3``
creates the parent run first, every job tags its run with ``mlflow.parentRunId`` (the MLflow UI nests
it), and at the end the parent gets ``<metric>/mean`` and ``<metric>/std`` for every ``test/*`` metric over
the children that differ only in the seed; a sweep over other keys (``recsys=din,dare``) gets one such pair
per config group, prefixed ``<recsys>-<group hash>/`` (:func:`group_children`).
"""

from __future__ import annotations

import logging
import os
import statistics
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from recsys.tracking.mlflow import mark_model_training

log = logging.getLogger(__name__)

PARENT_ENV = "RECSYS_SWEEP_PARENT_RUN_ID"


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


class MLflowSweepParent(Callback):
    """Hydra callback: a parent MLflow run per multirun."""

    def __init__(self) -> None:
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, exp_id = _client_and_experiment(config)
        overrides = " ".join(config.hydra.overrides.task) if "hydra" in config else ""
        run = client.create_run(
            exp_id, run_name=f"sweep-{config.data.name}", tags={"sweep_parent": "true", "sweep_overrides": overrides}
        )
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
        client.log_param(self.parent_id, "children", len(children))
        client.set_tag(
            self.parent_id,
            "sweep_groups",
            "; ".join(f"{p or 'all'}: {len(m)} run(s)" for p, m in groups.items()),
        )
        client.set_terminated(self.parent_id)
        os.environ.pop(PARENT_ENV, None)
