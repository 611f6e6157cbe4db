"""Task specs: which label column each prediction task reads and how it is trained (from the data config)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from recsys.errors import ConfigError

LOSSES = ("binary", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task.

    Attributes:
        name: metric prefix (``test/<name>/auc``) and key in ``CTRBatch.labels``.
        label: column of the sample table holding the target.
        loss: ``"binary"`` (BCE on a logit, AUC/logloss metrics) or ``"regression"`` (MSE, RMSE).
        weight: weight of this task's loss in the total.
    """

    name: str
    label: str = "label"
    loss: str = "binary"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"task '{self.name}': unknown loss '{self.loss}'; choose one of {list(LOSSES)}")
        if self.weight < 0:
            raise ConfigError(f"task '{self.name}': weight must be >= 0, got {self.weight}")


def parse_tasks(raw: Iterable[Mapping[str, Any]]) -> list[TaskSpec]:
    """Turn config entries into specs; names must be unique and the list non-empty."""
    specs = []
    for entry in raw:
        unknown = set(entry) - {"name", "label", "loss", "weight"}
        if unknown:
            raise ConfigError(f"task entry {dict(entry)}: unknown key(s) {sorted(unknown)}")
        specs.append(TaskSpec(**dict(entry)))
    if not specs:
        raise ConfigError("data.tasks is empty: give at least one task")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate task names in data.tasks: {names}")
    return specs
