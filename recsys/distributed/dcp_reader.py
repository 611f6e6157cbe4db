"""Reading sharded (DCP) checkpoint folders without running anything they contain.

torch's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain :mod:`pickle`, which runs
whatever callable the file names, and DCP loads non-tensor entries with ``torch.load(weights_only=False)``.
A checkpoint folder is user input (``resume=<folder>``, a copied run), so the package reads every DCP folder
through :class:`SafeFileSystemReader`:

* ``.metadata`` is unpickled by :class:`MetadataUnpickler`, which resolves only DCP's metadata classes
  (``torch.distributed.checkpoint.metadata``, ``filesystem._StorageInfo``), ``torch.Size``, dtypes, layouts,
  memory formats, ``pathlib`` paths and builtin containers; any other name stops the load before anything
  is called;
* the metadata must describe tensors only (this package's checkpoints never hold pickled objects: see
  :mod:`recsys.distributed.checkpoint`) stored in the folder's own shard files, and a read plan with a byte
  (pickled object) item is refused;
* tensor data is read as torch reads it, with ``torch.load(weights_only=True)``.

Any refusal is a one-line :class:`~recsys.errors.CheckpointError` naming the folder.
"""

from __future__ import annotations

import pathlib
import pickle
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from recsys.errors import CheckpointError

METADATA_FILE = ".metadata"  # DCP's name for the folder's metadata pickle
_BUILTINS = {"set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple, "slice": slice}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object: everything a DCP ``.metadata`` pickle may name."""
    allowed: dict[tuple[str, str], Any] = {}
    module = dcp_metadata.__name__
    for name, obj in vars(dcp_metadata).items():
        if isinstance(obj, type) and obj.__module__ == module:  # Metadata, TensorStorageMetadata, enums, ...
            allowed[(module, name)] = obj
    allowed[(dcp_filesystem.__name__, "_StorageInfo")] = dcp_filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):  # dtypes, layouts and memory formats are pickled as ``torch.<name>``
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # name -> torch.layout
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):  # StorageMeta.checkpoint_id
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed.update({("builtins", k): v for k, v in _BUILTINS.items()})
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


_ALLOWED = _allowed_globals()


class UnsafeMetadata(pickle.UnpicklingError):
    """``.metadata`` names something outside :func:`_allowed_globals`."""


class MetadataUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only DCP metadata names (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeMetadata(f"it names {module}.{name}, which is not DCP metadata") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadata("it holds a persistent reference (tensor storage), which DCP metadata never does")


def read_metadata_file(path: Path, folder: Path) -> dcp_metadata.Metadata:
    """Unpickle a DCP ``.metadata`` file safely and check it describes tensors only."""
    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder}: not a sharded checkpoint folder (no {path.name})") from err
    except UnsafeMetadata as err:
        raise CheckpointError(
            f"{folder}: refusing to read {path.name}: {err} (a checkpoint folder holds DCP metadata and tensors only)"
        ) from err
    except Exception as err:  # truncated or not a pickle
        raise CheckpointError(f"{folder}: cannot read {path.name} (truncated or corrupt?): {err}") from err
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{folder}: {path.name} is not DCP metadata (got {type(metadata).__name__})")
    objects = sorted(
        str(k) for k, v in metadata.state_dict_metadata.items() if not isinstance(v, dcp_metadata.TensorStorageMetadata)
    )
    if objects:
        raise CheckpointError(
            f"{folder}: {path.name} lists {len(objects)} non-tensor entries (e.g. {objects[:3]}); this package's "
            f"checkpoints hold tensors only and never load pickled objects"
        )
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    outside = sorted(
        {
            str(getattr(info, "relative_path", info))
            for info in storage.values()
            if not isinstance(info, dcp_filesystem._StorageInfo) or not _in_folder(info.relative_path)
        }
    )
    if outside or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(
            f"{folder}: {path.name} points at data files outside the folder or of unknown form (e.g. {outside[:3]}); "
            f"a checkpoint reads only its own __<rank>_<n>.distcp files"
        )
    return metadata


def _in_folder(name: Any) -> bool:
    """A plain file name (no folder part, not ``.``/``..``): DCP's shard files sit in the checkpoint folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata goes through :func:`read_metadata_file` and whose plans may hold
    tensors only (no pickled byte items)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path))
        self.folder = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))), self.folder)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise CheckpointError(f"{self.folder}: the load plan holds pickled objects; only tensors are read")
        return super().read_data(plan, planner)
