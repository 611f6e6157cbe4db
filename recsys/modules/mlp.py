"""Multi-layer perceptrons used by heads and towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``[B, in_dim] -> [B, hidden[-1]]`` (or ``out_dim`` if given) with optional leading BatchNorm.

    Layers: ``[BatchNorm1d(in_dim)] -> (Linear -> PReLU) * len(hidden) -> [Linear(out_dim)]``,
    as in the DARE/DIN heads (BN first, PReLU, no dropout by default).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)] if batch_norm else []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.PReLU(size)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def normal_init_(module: nn.Module, std: float) -> None:
    """DARE's init: every non-bias dense parameter ~ N(0, std), BatchNorm scale and PReLU slopes included.

    Embedding tables are left alone (they get their own ``init_fn``), and so are parameters flagged
    ``keep_init`` by their module (e.g. zero-initialised experts, see ``mtl.layers.keep_init``).
    """
    for name, param in module.named_parameters():
        if name.endswith("bias") or name.startswith("tables.") or ".tables." in name:
            continue
        if getattr(param, "keep_init", False):
            continue
        nn.init.normal_(param, mean=0.0, std=std)
