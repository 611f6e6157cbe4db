"""Process-group environment and the one decision every sharded run makes: DMP or unsharded tables.

``torchrun`` (or ``torch.distributed.launcher.api.elastic_launch``) sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``; without them a run is one process of world size 1.

:func:`sharding_path` is decided once per device type (FBGEMM's embedding kernels either run there or not)
and logged as the MLflow tag ``sharding``:

* ``dmp``: TorchRec DistributedModelParallel with FBGEMM table-batched embedding kernels;
* ``unsharded_fallback``: DMP was asked for but FBGEMM kernels do not run on the device (e.g. a CUDA
  machine without the CUDA ``fbgemm-gpu`` wheel), so tables stay whole ``nn.Embedding`` s and the
  strategy behaves like Lightning's plain DDP;
* ``unsharded``: DMP was not asked for (any other trainer config).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from recsys.ops.jagged import fbgemm_supports

log = logging.getLogger(__name__)

DMP, FALLBACK, UNSHARDED = "dmp", "unsharded_fallback", "unsharded"
# the Hydra ``_target_`` of configs/trainer/dmp.yaml: a trainer config with it asks for DMP
DMP_TRAINER_TARGET = "recsys.distributed.strategy.build_trainer"


@dataclass(frozen=True)
class WorldInfo:
    """Rank layout from the launcher's environment variables (world size 1 without a launcher)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def world_info() -> WorldInfo:
    """Read ``RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE`` (torchrun sets all four)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return WorldInfo(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
    )


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_backend(device_type: str) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise (what Lightning would pick too)."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group_from_env(backend: str | None, device_type: str) -> bool:
    """Initialise the default process group when launched by torchrun with ``WORLD_SIZE > 1``.

    Lightning skips its own initialisation when a group exists, so the pipeline can use collectives
    (agreeing on one output folder, preparing data on rank 0 first) before the Trainer is built.
    Returns True when a multi-rank group is (now) initialised.
    """
    info = world_info()
    if info.world_size <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = backend or default_backend(device_type)
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
        log.info("process group %s: rank %d of %d", backend, info.rank, info.world_size)
    return True


@functools.cache
def dmp_supported(device_type: str) -> bool:
    """True when FBGEMM's kernels run on ``device_type`` (probed once; see ``recsys.ops.jagged``).

    The table-batched embedding kernels DMP shards onto ship in the same library as the jagged ops, so
    the jagged probe stands for both: ``fbgemm-gpu-cpu`` gives CPU kernels, only the CUDA ``fbgemm-gpu``
    wheel gives CUDA ones.
    """
    return fbgemm_supports(device_type)


def sharding_path(requested: bool, device_type: str) -> str:
    """``dmp``, ``unsharded_fallback`` or ``unsharded`` (module docstring); warns once on fallback."""
    if not requested:
        return UNSHARDED
    if dmp_supported(device_type):
        return DMP
    _warn_fallback(device_type)
    return FALLBACK


@functools.cache
def _warn_fallback(device_type: str) -> None:
    log.warning(
        "FBGEMM kernels do not run on %s: TorchRec DMP is off, embedding tables stay unsharded "
        "(torch-native ops, data-parallel over ranks). Install the CUDA fbgemm-gpu wheel to shard.",
        device_type,
    )


def trainer_device_type(trainer_cfg: Mapping[str, Any]) -> str:
    """``cuda`` when the trainer config's accelerator resolves to a visible GPU, else ``cpu``."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def requests_dmp(trainer_cfg: Mapping[str, Any]) -> bool:
    """True for a trainer config built by :func:`recsys.distributed.strategy.build_trainer`."""
    return str(trainer_cfg.get("_target_", "")) == DMP_TRAINER_TARGET
