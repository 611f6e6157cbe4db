"""Fused (in-backward) optimisers for sharded embedding tables.

FBGEMM's table-batched kernels update each table inside the backward pass, so tables never hold a
``.grad`` and need no optimiser step. TorchRec learns which update to fuse from attributes that
:func:`torch.distributed.optim._apply_optimizer_in_backward` attaches to each table parameter before
DistributedModelParallel shards it (docs/distributed.md).

Config (``trainer.fused_optimizer``)::

    name: row_wise_adagrad   # sgd | adagrad | row_wise_adagrad (CPU and CUDA) | adam (CUDA only)
    lr: 0.05
    eps: 1.0e-8              # optional, per optimiser (see FUSED_OPTIMIZERS)

Gradient scale: TorchRec divides table gradients by the world size (``torchrec.distributed.comm_ops``
gradient division, on by default) as DDP averages dense ones, so a W-rank step sees the gradient of the
mean loss over the global batch, like one process on the concatenated batch (up to BatchNorm statistics,
which are per rank); the same ``lr`` applies at any world size. See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward

from recsys.compat import RowWiseAdagrad
from recsys.compat import trec_optimizers as trec
from recsys.errors import ConfigError

# name -> (placeholder class TorchRec maps to an FBGEMM optimiser, accepted kwargs, runs on CPU)
FUSED_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], tuple[str, ...], bool]] = {
    "sgd": (trec.SGD, ("lr",), True),
    "adagrad": (trec.Adagrad, ("lr", "eps"), True),
    "row_wise_adagrad": (RowWiseAdagrad, ("lr", "eps", "weight_decay"), True),
    "adam": (trec.Adam, ("lr", "eps", "beta1", "beta2", "weight_decay"), False),
}
CPU_CHOICES = tuple(name for name, (_, _, cpu) in FUSED_OPTIMIZERS.items() if cpu)


@dataclass(frozen=True)
class FusedOptimizerSpec:
    """A validated ``trainer.fused_optimizer`` entry."""

    name: str
    kwargs: dict[str, float] = field(default_factory=dict)

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return FUSED_OPTIMIZERS[self.name][0]


def parse_fused_optimizer(config: Mapping[str, Any], device_type: str) -> FusedOptimizerSpec:
    """Validate ``{name, lr, ...}`` for ``device_type``; raises ``ValueError`` naming the option."""
    config = dict(config)
    name = str(config.pop("name", "row_wise_adagrad"))
    if name not in FUSED_OPTIMIZERS:
        raise ConfigError(f"trainer.fused_optimizer.name='{name}' is unknown; choose one of {sorted(FUSED_OPTIMIZERS)}")
    _, accepted, on_cpu = FUSED_OPTIMIZERS[name]
    if device_type != "cuda" and not on_cpu:
        raise ConfigError(
            f"trainer.fused_optimizer.name='{name}' is not available on {device_type}: FBGEMM's CPU kernels "
            f"implement {list(CPU_CHOICES)} only (use one of them, or run on CUDA with fbgemm-gpu)"
        )
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ConfigError(f"trainer.fused_optimizer: {unknown} not accepted by '{name}'; accepted: {list(accepted)}")
    if "lr" not in config:
        raise ConfigError(f"trainer.fused_optimizer.lr is required for '{name}'")
    return FusedOptimizerSpec(name, {k: float(v) for k, v in config.items()})


def apply_fused_optimizer(params: Iterable[nn.Parameter], spec: FusedOptimizerSpec) -> int:
    """Mark table parameters for an in-backward update (call before DMP). Returns how many were marked."""
    params = [p for p in params if not hasattr(p, "_optimizer_classes")]
    if params:
        _apply_optimizer_in_backward(spec.optimizer_class, params, dict(spec.kwargs))
    return len(params)
