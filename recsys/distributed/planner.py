"""Sharding plan from Hydra: per-table constraints (sharding type, compute kernel) and the planner topology.

Config shape (``configs/trainer/dmp.yaml``)::

    sharding:              # key -> sharding type (or {sharding_types: [...], compute_kernels: [...]})
      item: row_wise       # every table whose name contains the token run "item" (att_item, repr_item, ...)
      category: table_wise
      default: table_wise  # tables no other key matches
    compute_kernel: fused

A key matches a table when its ``_``-separated tokens occur as a contiguous run in the table name's
tokens (``item`` matches ``att_item`` and ``att_item_hist``; ``att_item`` matches ``att_item_hist``),
or when it equals the name. The longest matching key wins; two equally long matches are an error. A key
that matches no table is logged as a warning (the default keys serve several models; check for typos).

Pinning every table matters: left alone, the planner picks data-parallel for small tables, and
data-parallel ``EmbeddingCollection`` s fail on CPU (TorchRec has no CPU kernel for them; docs/distributed.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from recsys.compat import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionSharder,
    EmbeddingCollection,
    EmbeddingCollectionSharder,
    EmbeddingShardingPlanner,
    ModuleSharder,
    ParameterConstraints,
    ShardingPlan,
    Topology,
)
from recsys.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_KEY = "default"
# sharding types the sharders offer but that fail or are missing on CPU (checked with fbgemm-gpu-cpu)
_CPU_EXCLUDED = {EmbeddingCollection: {"data_parallel"}}
_KERNELS_CPU = ("fused", "dense")
_KERNELS_CUDA = ("fused", "fused_uvm", "fused_uvm_caching", "dense")


def table_names(module: nn.Module) -> dict[str, type]:
    """Table name -> type of its collection (``EmbeddingCollection`` / ``EmbeddingBagCollection``)."""
    names: dict[str, type] = {}
    for sub in module.modules():
        if isinstance(sub, (EmbeddingCollection, EmbeddingBagCollection)):
            for config in sub.embedding_configs():
                if config.name in names:
                    raise ConfigError(f"table name '{config.name}' is used by two embedding collections")
                names[config.name] = type(sub)
    return names


def _match_length(key: str, table: str) -> int:
    """Tokens of ``key`` matched in ``table`` (0 = no match); an exact name counts as longest."""
    if key == table:
        return 10_000
    k, t = key.split("_"), table.split("_")
    for start in range(len(t) - len(k) + 1):
        if t[start : start + len(k)] == k:
            return len(k)
    return 0


def _as_types(key: str, value: Any) -> tuple[list[str], list[str] | None]:
    """A config value -> (sharding types, compute kernels or None)."""
    if isinstance(value, str):
        return [value], None
    if isinstance(value, Sequence):
        return [str(v) for v in value], None
    if isinstance(value, Mapping):
        unknown = set(value) - {"sharding_types", "compute_kernels"}
        if unknown:
            raise ConfigError(
                f"trainer.sharding.{key}: unknown field(s) {sorted(unknown)}; use sharding_types and compute_kernels"
            )
        types = value.get("sharding_types")
        kernels = value.get("compute_kernels")
        types = [types] if isinstance(types, str) else list(types or [])
        kernels = [kernels] if isinstance(kernels, str) else (list(kernels) if kernels else None)
        return types, kernels
    raise ConfigError(f"trainer.sharding.{key}: expected a sharding type, a list or a mapping, got {value!r}")


def _sharder_for(kind: type) -> ModuleSharder:
    return EmbeddingCollectionSharder() if kind is EmbeddingCollection else EmbeddingBagCollectionSharder()


def build_constraints(
    module: nn.Module,
    sharding: Mapping[str, Any],
    device_type: str,
    compute_kernel: str = "fused",
) -> dict[str, ParameterConstraints]:
    """Per-table :class:`ParameterConstraints` for every table of ``module`` (see module docstring).

    Raises ``ValueError`` naming the key for unknown or unsupported sharding types and kernels,
    ambiguous or unmatched keys.
    """
    tables = table_names(module)
    if not tables:
        raise ConfigError("trainer=dmp: the model has no TorchRec embedding tables to shard")
    kernels_ok = _KERNELS_CUDA if device_type == "cuda" else _KERNELS_CPU
    keys = [k for k in sharding if k != DEFAULT_KEY]
    used = set()
    constraints: dict[str, ParameterConstraints] = {}
    for table, kind in tables.items():
        scored = sorted(((_match_length(k, table), k) for k in keys), reverse=True)
        scored = [(s, k) for s, k in scored if s > 0]
        if len(scored) > 1 and scored[0][0] == scored[1][0]:
            raise ConfigError(
                f"trainer.sharding: keys '{scored[0][1]}' and '{scored[1][1]}' both match table "
                f"'{table}'; use the full table name as key"
            )
        key = scored[0][1] if scored else (DEFAULT_KEY if DEFAULT_KEY in sharding else None)
        if key is None:
            continue  # unconstrained: the planner decides
        used.add(key)
        types, kernels = _as_types(key, sharding[key])
        offered = set(_sharder_for(kind).sharding_types(device_type))
        if device_type != "cuda":
            offered -= _CPU_EXCLUDED.get(kind, set())
        bad = [t for t in types if t not in offered]
        if bad or not types:
            raise ConfigError(
                f"trainer.sharding.{key}={types} for table '{table}': "
                f"{kind.__name__} on {device_type} supports {sorted(offered)}"
            )
        kernels = kernels or ["dense" if types == ["data_parallel"] else compute_kernel]
        bad = [k for k in kernels if k not in kernels_ok]
        if bad:
            raise ConfigError(
                f"trainer compute kernel {bad} for table '{table}': {device_type} supports {list(kernels_ok)}"
            )
        constraints[table] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    unused = sorted(set(keys) - used)
    if unused:  # a warning, not an error: configs/trainer/dmp.yaml's keys serve models with other tables
        log.warning("trainer.sharding: key(s) %s match no table of this model; tables are %s", unused, sorted(tables))
    return constraints


def sharders() -> list[ModuleSharder]:
    """The sharders DMP uses: sequence (``EmbeddingCollection``) and pooled (``EmbeddingBagCollection``); the
    fused optimiser reaches them through the tables' in-backward optimiser attributes (``recsys.distributed.optim``)."""
    return [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]


def build_plan(
    module: nn.Module,
    constraints: dict[str, ParameterConstraints],
    module_sharders: list[ModuleSharder],
    world_size: int,
    local_world_size: int,
    device_type: str,
    topology: Mapping[str, Any] | None = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast it (``collective_plan``), so all ranks shard identically.

    ``topology``: extra :class:`torchrec.distributed.planner.Topology` arguments from Hydra
    (e.g. ``hbm_cap``, ``ddr_cap`` in bytes); world size and compute device come from the launcher.
    """
    topo = Topology(
        world_size=world_size, local_world_size=local_world_size, compute_device=device_type, **dict(topology or {})
    )
    planner = EmbeddingShardingPlanner(topology=topo, constraints=constraints)
    if dist.is_initialized():
        return planner.collective_plan(module, module_sharders, dist.GroupMember.WORLD)
    return planner.plan(module, module_sharders)
