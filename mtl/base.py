"""The contract every tower in ``mtl/`` follows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mtl.spec import TaskSpec
from recsys.errors import ConfigError


@dataclass
class TowerOutput:
    """Attributes:
    logits: task name -> ``[B]`` (a logit for binary tasks, the prediction for regression).
    aux_losses: name -> scalar auxiliary losses (load balance, priors), already weighted.
    extras: diagnostics such as gate probabilities ``[B, n_experts]`` per task.
    """

    logits: dict[str, torch.Tensor]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Tower(nn.Module):
    """Base class: ``forward(features [B, in_dim]) -> TowerOutput``. Subclasses take ``in_dim`` and ``tasks``."""

    def __init__(self, in_dim: int, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("a tower needs at least one task")
        self.in_dim = in_dim
        self.task_names = [t.name for t in tasks]

    def forward(self, features: torch.Tensor) -> TowerOutput:  # pragma: no cover - abstract
        raise NotImplementedError
