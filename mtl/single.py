"""One BN-MLP head per task on the shared features (the default; DARE's head for one task)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl.base import Tower, TowerOutput
from mtl.layers import MLP
from mtl.spec import TaskSpec


class SingleTower(Tower):
    """``[B, in_dim]`` -> per task ``BN -> Linear(200) -> PReLU -> Linear(80) -> PReLU -> Linear(1)``."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        hidden: Sequence[int] = (200, 80),
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        self.heads = nn.ModuleDict(
            {name: MLP(in_dim, hidden, out_dim=1, batch_norm=batch_norm, dropout=dropout) for name in self.task_names}
        )

    def forward(self, features: torch.Tensor) -> TowerOutput:
        return TowerOutput(logits={name: head(features).squeeze(-1) for name, head in self.heads.items()})
