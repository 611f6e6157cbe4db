"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), written crash-safely.

A checkpoint is a *directory*::

    <name>.ckpt/
      .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: model tensors + optimiser state tensors;
                                                   each rank writes its own table shards (and the fused
                                                   optimiser state of those shards)
      trainer_state.pt                             rank 0: everything else Lightning saves (loops,
                                                   callbacks, epoch, step); tensors and primitives only,
                                                   loaded with ``weights_only=True``

Only tensors go through DCP: DCP unpickles non-tensor entries with ``weights_only=False``. Folders are read
through :class:`~recsys.distributed.dcp_reader.SafeFileSystemReader` (``.metadata`` unpickled with an
allow-list of DCP metadata classes, tensors only), so a crafted folder cannot run code.

Writes go to ``<name>.ckpt.tmp`` first; after a barrier rank 0 moves any previous checkpoint to
``<name>.ckpt.old``, renames the new one into place and deletes the old one. A crash therefore leaves
either the previous checkpoint or the new one whole (in the instant between the two renames only
``.old`` exists, and :func:`resolve_checkpoint_dir` falls back to it). All ranks must see the same
filesystem (one host, or a shared mount).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from recsys.distributed.dcp_reader import METADATA_FILE, SafeFileSystemReader, read_metadata_file
from recsys.errors import CheckpointError

log = logging.getLogger(__name__)
# TorchRec's sharded state is ShardedTensor, which torch marks as deprecated on every DCP call
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)

TRAINER_STATE = "trainer_state.pt"
FORMAT = "recsys-dcp-1"
_TENSOR_PARTS = ("state_dict", "optimizer_states")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def split_tensors(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dict -> (same nesting with only tensor leaves, same nesting with only other leaves).

    Lists and tuples are leaves (optimiser ``param_groups``); empty branches are dropped.
    """
    tensors: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            t, o = split_tensors(value)
            if t:
                tensors[key] = t
            if o or not t:
                other[key] = o
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            other[key] = value
    return tensors, other


def merge_trees(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_tensors` (recursive union; ``b`` wins on leaf conflicts)."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def _tensor_payload(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lightning checkpoint dict -> (DCP payload, rank-0 remainder).

    ``optimizer_states`` (a list) becomes ``{"0": ..., "1": ...}`` in the payload.
    """
    payload: dict[str, Any] = {}
    rest = {k: v for k, v in checkpoint.items() if k not in _TENSOR_PARTS}
    if "state_dict" in checkpoint:
        payload["state_dict"], rest["state_dict"] = split_tensors(checkpoint["state_dict"])
    if "optimizer_states" in checkpoint:
        states = {str(i): s for i, s in enumerate(checkpoint["optimizer_states"])}
        payload["optimizer_states"], other = split_tensors(states)
        rest["optimizer_states"] = [other.get(str(i), {}) for i in range(len(states))]
    return payload, rest


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint folder, or its ``.old`` twin left by a crash between the two renames."""
    path = Path(path)
    if (path / TRAINER_STATE).exists():
        return path
    old = path.with_name(path.name + ".old")
    if (old / TRAINER_STATE).exists():
        log.warning("checkpoint %s is missing; using %s (a save was interrupted)", path, old)
        return old
    raise CheckpointError(f"{path}: not a sharded checkpoint folder (no {TRAINER_STATE})")


def save_sharded(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Collective: every rank calls it with its own ``checkpoint`` (local shards); see module docstring."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    payload, rest = _tensor_payload(checkpoint)
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # leftover of an interrupted save
    _barrier()
    dcp.save(payload, checkpoint_id=str(tmp))
    if _rank() == 0:
        torch.save({**rest, "format": FORMAT}, tmp / TRAINER_STATE)
    _barrier()
    if _rank() == 0:
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


def _load_trainer_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.pt`` with ``weights_only=True``; CheckpointError names the file if it is not one."""
    file = folder / TRAINER_STATE
    try:
        rest = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, a pickle weights_only refuses
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{file}: cannot read (truncated, corrupt or unsafe?): {type(err).__name__}: {first}"
        ) from err
    if not isinstance(rest, dict):
        raise CheckpointError(f"{file}: expected a dict of trainer state, got {type(rest).__name__}")
    return rest


def load_sharded(
    path: str | Path,
    model_state: Mapping[str, Any],
    optimizer_states: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Collective: load ``path`` *in place* into ``model_state`` (a live ``module.state_dict()``, whose
    tensors and ShardedTensors share storage with the module) and ``optimizer_states`` (live
    ``optimizer.state_dict()`` s with their lazy state already created). Returns the full Lightning
    checkpoint dict (these tensors + the rank-0 remainder).
    """
    folder = resolve_checkpoint_dir(path)
    rest = _load_trainer_state(folder)
    if rest.pop("format", None) != FORMAT:
        raise CheckpointError(f"{folder}: unknown checkpoint format (expected {FORMAT})")
    template: dict[str, Any] = {"state_dict": split_tensors(model_state)[0]}
    if optimizer_states is not None:
        saved = len(rest.get("optimizer_states", []))
        if saved != len(optimizer_states):
            raise CheckpointError(f"{folder}: holds {saved} optimiser states, the run has {len(optimizer_states)}")
        states = {str(i): s for i, s in enumerate(optimizer_states)}
        template["optimizer_states"] = split_tensors(states)[0]
    read_metadata_file(folder / METADATA_FILE, folder)  # a hostile .metadata stops here, before DCP reads it
    try:
        dcp.load(template, storage_reader=SafeFileSystemReader(folder))
    except (Exception, CheckpointException) as err:  # missing keys, other shapes, unreadable shard files
        raise CheckpointError(
            f"{folder}: cannot load this sharded checkpoint into the model ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r})"
        ) from err
    checkpoint = dict(rest)
    checkpoint["state_dict"] = merge_trees(rest.get("state_dict", {}), template["state_dict"])
    if optimizer_states is not None:
        loaded = template.get("optimizer_states", {})
        checkpoint["optimizer_states"] = [
            merge_trees(other, loaded.get(str(i), {})) for i, other in enumerate(rest["optimizer_states"])
        ]
    else:
        checkpoint.pop("optimizer_states", None)
    return checkpoint


def remove_sharded(path: str | Path) -> None:
    """Rank 0 deletes a checkpoint folder (Lightning's ``remove_checkpoint``)."""
    if _rank() == 0 and Path(path).exists():
        shutil.rmtree(path)


# ---- unsharded <-> sharded state (initialisation, comparison, export) ------------------------------


def _is_sharded(value: Any) -> bool:
    return hasattr(value, "local_shards") and hasattr(value, "metadata")


@torch.no_grad()
def load_full_state_dict(module: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy whole (unsharded) tensors into a sharded module: each rank copies the rows/columns of its
    local shards. ``full`` maps ``module.state_dict()`` keys to full tensors (an unsharded model's state)."""
    state = module.state_dict()
    missing = sorted(set(state) - set(full))
    if strict and missing:
        raise KeyError(f"load_full_state_dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for key, value in state.items():
        if key not in full:
            continue
        source = full[key]
        if _is_sharded(value):
            for shard in value.local_shards():
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(source[index].to(shard.tensor.device))
        else:
            value.copy_(source.to(value.device))


@torch.no_grad()
def gather_full_state_dict(module: nn.Module, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Collective: whole tensors of a sharded module on rank ``dst`` (CPU copies), ``None`` elsewhere."""
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if _is_sharded(value):
            full = torch.empty(value.size(), dtype=value.dtype) if _rank() == dst else None
            value.gather(dst=dst, out=full)
            if full is not None:
                out[key] = full
        else:
            out[key] = value.detach().cpu().clone()
    return out if _rank() == dst else None


@torch.no_grad()
def init_sharded_tables(module: nn.Module, init_fns: Mapping[str, Callable[[torch.Tensor], Any]], seed: int) -> int:
    """Re-initialise the local shards of each sharded table with its config's ``init_fn``.

    FBGEMM's kernels initialise tables uniformly and ignore ``EmbeddingConfig.init_fn`` (e.g. DARE's
    N(0, 0.01)). ``init_fns`` maps table name -> init function; each shard draws from a generator
    seeded by (seed, table, shard offset), so results do not depend on which rank holds a shard.
    Returns the number of shards initialised.
    """
    import zlib

    count = 0
    for key, value in module.state_dict().items():
        table = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
        if table not in init_fns or not _is_sharded(value):
            continue
        for shard in value.local_shards():
            offsets = ",".join(map(str, shard.metadata.shard_offsets))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{seed}:{table}:{offsets}".encode()))
                if shard.tensor.device.type == "cpu":
                    init_fns[table](shard.tensor)
                else:  # draw on the CPU so the values do not depend on the device's RNG
                    tmp = torch.empty_like(shard.tensor, device="cpu")
                    init_fns[table](tmp)
                    shard.tensor.copy_(tmp)
            count += 1
    return count
