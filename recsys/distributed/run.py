"""What ``pipelines.train`` needs to run the same code on one process or on every torchrun rank.

:func:`run_context` is called once, before any data or model is built:

* it decides the sharding path (``dmp`` / ``unsharded_fallback`` / ``unsharded``, the MLflow tag);
* under torchrun it initialises the process group early (Lightning reuses it) and makes every rank use
  rank 0's output folder, so checkpoint shards of all ranks land in one DCP folder;
* it tells the model factories where to build tables (``meta`` under DMP).

Rank-0-only side effects (MLflow artefacts, bundle, ``metrics.json``) check :attr:`RunContext.is_zero`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from recsys.distributed.env import (
    DMP,
    WorldInfo,
    init_process_group_from_env,
    requests_dmp,
    sharding_path,
    trainer_device_type,
    world_info,
)

RANK_SUBDIR_RESOLVER = "recsys_rank_subdir"


def register_rank_resolver() -> None:
    """``${recsys_rank_subdir:}`` -> ``""`` on rank 0, ``/rank<k>`` elsewhere (Hydra run dirs per rank)."""
    if not OmegaConf.has_resolver(RANK_SUBDIR_RESOLVER):
        OmegaConf.register_new_resolver(
            RANK_SUBDIR_RESOLVER, lambda: "" if int(os.environ.get("RANK", 0)) == 0 else f"/rank{os.environ['RANK']}"
        )


class StateDictView:
    """Stands in for a module where only ``state_dict()`` is read (e.g. ``recsys.bundle.export_bundle``)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = dict(state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


@dataclass
class RunContext:
    """Attributes:
    path: ``dmp``, ``unsharded_fallback`` or ``unsharded``.
    world: rank layout (world size 1 without torchrun).
    output_dir: the run folder, identical on every rank (rank 0's Hydra output dir).
    table_device: where factories build embedding tables (``meta`` under DMP, else ``None``).
    """

    path: str
    world: WorldInfo
    output_dir: Path
    table_device: torch.device | None

    @property
    def sharded(self) -> bool:
        return self.path == DMP

    @property
    def is_zero(self) -> bool:
        return self.world.is_zero

    @contextlib.contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writing the data cache), then the others (reading it)."""
        multi = dist.is_available() and dist.is_initialized() and self.world.world_size > 1
        if multi and not self.is_zero:
            dist.barrier()
        try:
            yield
        finally:
            if multi and self.is_zero:
                dist.barrier()

    def best_weights(self, module: nn.Module, model: nn.Module, best_path: str) -> StateDictView | None:
        """Collective under DMP: load the best checkpoint folder into the sharded ``module`` in place and
        gather ``model``'s whole tensors on rank 0 (``None`` on other ranks)."""
        from recsys.distributed.checkpoint import gather_full_state_dict, load_sharded

        if best_path:
            load_sharded(best_path, module.state_dict())
        full = gather_full_state_dict(model)
        return StateDictView(full) if full is not None else None


def run_context(trainer_cfg: Mapping[str, Any], output_dir: Path) -> RunContext:
    """See the module docstring."""
    device_type = trainer_device_type(trainer_cfg)
    path = sharding_path(requests_dmp(trainer_cfg), device_type)
    if init_process_group_from_env(trainer_cfg.get("backend"), device_type):
        shared = [str(output_dir)]
        dist.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
    return RunContext(path, world_info(), output_dir, torch.device("meta") if path == DMP else None)
