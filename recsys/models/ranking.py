"""Backbone + task tower = a ranking model (the ``nn.Module`` a LightningModule trains)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtl.base import Tower
from mtl.layers import normal_init_
from recsys.data.batch import CTRBatch
from recsys.errors import ConfigError
from recsys.models.sequential import factory_name


@dataclass
class RankingOutput:
    """``logits``: task -> ``[B]``; ``aux_logits``: backbone aux heads -> ``[B]``;
    ``aux_losses``: tower regularisers (scalars); ``extras``: diagnostics."""

    logits: dict[str, torch.Tensor]
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


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


def build_ranking_model(
    datamodule: Any,
    backbone: Callable[..., nn.Module],
    tower: Callable[..., Tower] | None,
    init_std: float | None = 0.01,
) -> RankingModel:
    """backbone -> tower for a prepared datamodule (or anything with ``backbone_inputs()`` and ``tasks``).

    ``backbone`` and ``tower`` are the ``_partial_`` factories of the ``recsys`` and ``mtl`` configs.
    """
    inputs = datamodule.backbone_inputs()
    try:
        inspect.signature(backbone).bind(**inputs)
    except TypeError as err:  # e.g. recsys=fields on CTR samples, or a sequence backbone on tabular data
        name = factory_name(backbone)
        raise ConfigError(
            f"backbone {name} cannot be built from this dataset's inputs {sorted(inputs)} ({err}): sequence "
            f"backbones (recsys=dare|twin|twin_4e|twin_proj|din) need CTR samples (data=synthetic|ml100k|"
            f"ml100k_mtl|taobao); recsys=fields needs tabular data (data=census|ali_ccp|aliexpress|byterec)"
        ) from err
    if tower is None:
        raise ConfigError(
            f"backbone {factory_name(backbone)} needs a task tower: choose mtl=single|shared_bottom|mmoe|..."
        )
    net = backbone(**inputs)
    head = tower(in_dim=net.output_dim, tasks=datamodule.tasks)
    return RankingModel(net, head, init_std=init_std)
