"""Backbone + task tower = a ranking model (the ``nn.Module`` a LightningModule trains)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn

from mtl.base import Tower
from recsys.data.batch import CTRBatch
from recsys.modules.mlp import normal_init_


@dataclass
class RankingOutput:
    """``logits``: task -> ``[B]``; ``aux_logits``: backbone aux heads -> ``[B]``;
    ``aux_losses``: tower regularisers (scalars); ``extras``: diagnostics."""

    logits: Dict[str, torch.Tensor]
    aux_logits: Dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


class RankingModel(nn.Module):
    """``batch -> backbone -> features [B, F] -> tower -> logits per task``.

    ``init_std`` re-initialises every dense non-bias weight ~ N(0, init_std) (DARE's init); ``None`` keeps
    the PyTorch defaults.
    """

    def __init__(self, backbone: nn.Module, tower: Tower, init_std: float | None = 0.01) -> None:
        super().__init__()
        self.backbone = backbone
        self.tower = tower
        if init_std is not None:
            normal_init_(self, init_std)

    def forward(self, batch: CTRBatch) -> RankingOutput:
        b = self.backbone(batch)
        t = self.tower(b.features)
        return RankingOutput(t.logits, b.aux_logits, t.aux_losses, {**b.extras, **t.extras})
