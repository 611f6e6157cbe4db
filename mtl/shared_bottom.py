"""Shared-Bottom: ``y_t = h_t(f(x))`` — one bottom MLP shared by every task, then an MLP head per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl.base import Tower, TowerOutput
from mtl.layers import GroupedMLP, TaskHeads
from mtl.spec import TaskSpec


class SharedBottomTower(Tower):
    """``[B, in_dim]`` -> bottom ``[B, bottom_hidden[-1]]`` -> heads ``{task: [B]}``."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        bottom_hidden: Sequence[int] = (128,),
        tower_hidden: Sequence[int] = (32,),
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        self.bottom = GroupedMLP(1, in_dim, bottom_hidden, norm=norm, activation=activation, dropout=dropout)
        self.heads = TaskHeads(
            self.task_names, self.bottom.out_dim, tower_hidden, activation=activation, dropout=dropout
        )

    def forward(self, features: torch.Tensor) -> TowerOutput:
        shared = self.bottom(features)[0]  # [B, d]
        return TowerOutput(logits=self.heads(shared))
