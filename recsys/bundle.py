"""Model bundle: everything a scoring job needs from a training run, in one folder.

    <bundle>/config.yaml            resolved training config (recsys, mtl, data.tasks, ...)
    <bundle>/dataset/meta.json      vocabulary sizes, max_len, data fingerprint
    <bundle>/dataset/id_map_*.parquet   raw id -> table row, per id column (absent = raw ids kept)
    <bundle>/weights.pt             model state_dict (tensors only; loaded with weights_only=True)
    <bundle>/bundle.json            identity: run name, run id, model builder, sha256 of weights.pt and of
                                    every other file above (``files_sha256``)

Training writes it atomically to ``<run dir>/model`` and logs it to MLflow as the artifact folder ``model``.

A bundle is untrusted input (it may come from a shared MLflow server). :func:`load_bundle` therefore

* checks every file against the sha256 recorded in ``bundle.json`` before using it (a damaged, truncated,
  missing or extra file stops the load), and reads each file's bytes once, the ones it hashed;
* builds the model only from the package's registered backbones, towers and builders
  (:mod:`recsys.registry`) with plain values: nothing in a bundle names code to import or run;
* checks the model's tensor shapes against ``weights.pt`` on the ``meta`` device before allocating anything,
  loads the weights with ``weights_only=True`` and refuses NaN or infinite weights.

Every failure is a :class:`~recsys.errors.BundleError` whose one-line message names the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml

from mtl.spec import TaskSpec, parse_tasks
from recsys import registry
from recsys.data.cache import META_FILE, DatasetMeta
from recsys.errors import BundleError, UserError
from recsys.io import atomic_write_bytes, write_json_atomic
from recsys.ops.id_map import DeviceIdMap
from recsys.safe_load import UnreadableTensorFile, describe, load_tensors, shape_mismatch

ID_COLUMNS = ("user", "item", "category")
BUNDLE_FILE = "bundle.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.pt"
META_PATH = f"dataset/{META_FILE}"
ID_MAP_PATHS = {column: f"dataset/id_map_{column}.parquet" for column in ID_COLUMNS}
#: the files ``files_sha256`` may list (bundle-relative); config.yaml and meta.json must be among them
HASHED_FILES = (CONFIG_FILE, META_PATH, *ID_MAP_PATHS.values())
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_bundle(
    target: Path, config: Mapping[str, Any], dataset_dir: Path, model: torch.nn.Module, identity: Mapping[str, Any]
) -> Path:
    """Write the bundle into a temp folder beside ``target`` and rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / "dataset").mkdir()
        for path in Path(dataset_dir).iterdir():
            if path.name == META_FILE or path.name.startswith("id_map_"):
                shutil.copy2(path, tmp / "dataset" / path.name)
        atomic_write_bytes(tmp / CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False).encode())
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        weights = buffer.getvalue()
        atomic_write_bytes(tmp / WEIGHTS_FILE, weights)
        files = {name: _sha256((tmp / name).read_bytes()) for name in HASHED_FILES if (tmp / name).is_file()}
        write_json_atomic(tmp / BUNDLE_FILE, {**identity, "weights_sha256": _sha256(weights), "files_sha256": files})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class IdMapper:
    """Raw ids -> table rows; unseen ids -> -1.

    A direct-address table over the raw id range when that range is at most ``DENSE_SPAN`` ids (one gather
    per id), else ``np.searchsorted`` over the sorted map.
    """

    DENSE_SPAN = 1 << 23  # 64 MiB of int64 rows at most

    def __init__(self, raw: np.ndarray | None, rows: np.ndarray | None, limit: int) -> None:
        self.limit = limit
        self._dense: np.ndarray | None = None
        if raw is None:
            self.raw = self.rows = None
            return
        order = np.argsort(raw, kind="stable")
        self.raw, self.rows = raw[order], rows[order]
        if len(raw) and int(self.raw[-1]) - int(self.raw[0]) < self.DENSE_SPAN:
            # slots 0 and -1 catch ids below / above the range: raw id r sits at slot r - raw[0] + 1
            self._dense = np.full(int(self.raw[-1]) - int(self.raw[0]) + 3, -1, dtype=np.int64)
            self._dense[self.raw - self.raw[0] + 1] = self.rows

    def __call__(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``ids`` (int64, same shape), written into ``out`` when given."""
        if self._dense is not None:
            slots = np.clip(ids, self.raw[0] - 1, self.raw[-1] + 1)
            slots -= self.raw[0] - 1
            return self._dense.take(slots, out=out, mode="clip")  # slots are in range: clip skips buffering
        if self.raw is None:  # identity map: ids are table rows already
            rows = np.where((ids >= 1) & (ids <= self.limit), ids, -1)
        else:
            pos = np.searchsorted(self.raw, ids).clip(0, len(self.raw) - 1)
            rows = np.where(self.raw[pos] == ids, self.rows[pos], -1)
        if out is None:
            return rows
        out[...] = rows
        return out

    def to_torch(self, device: str | torch.device = "cpu") -> DeviceIdMap:
        """The same map as a torch module on ``device`` (:class:`~recsys.ops.id_map.DeviceIdMap`): maps id
        tensors of any shape where they are, with this map's results (``-1`` = unseen)."""
        if self._dense is not None:
            table = DeviceIdMap(dense=torch.from_numpy(self._dense), low=int(self.raw[0]), high=int(self.raw[-1]))
        elif self.raw is None:
            table = DeviceIdMap(limit=self.limit)
        else:
            table = DeviceIdMap(
                raw=torch.from_numpy(self.raw.astype(np.int64)), rows=torch.from_numpy(self.rows.astype(np.int64))
            )
        return table.to(device)


@dataclass
class LoadedBundle:
    """A bundle read back: the model in eval mode plus what is needed to feed it.

    ``weights_sha256``: sha256 of the ``weights.pt`` bytes the model was loaded from (checked against
    ``bundle.json``); the value to record beside anything the model produced.
    """

    model: torch.nn.Module
    config: dict[str, Any]
    meta: DatasetMeta
    tasks: list[TaskSpec]
    mappers: dict[str, IdMapper]
    identity: dict[str, Any]
    weights_sha256: str = ""


def resolve_bundle(model: str, download_dir: Path) -> Path:
    """A bundle folder, a run folder holding ``model/``, or ``runs:/<run_id>`` (downloaded from MLflow)."""
    if model.startswith("runs:/"):
        import mlflow

        run_id = model[len("runs:/") :].strip("/").split("/")[0]
        try:
            return Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(download_dir))
            )
        except Exception as err:  # MlflowException (unknown run, no 'model' artifact), OSError (server down)
            raise BundleError(
                f"model={model}: cannot download the run's model bundle from the MLflow tracking server "
                f"{mlflow.get_tracking_uri()} ({describe(err)}); check the run id and MLFLOW_TRACKING_URI"
            ) from err
    path = Path(model)
    if (path / "model" / BUNDLE_FILE).exists():
        path = path / "model"
    if not (path / BUNDLE_FILE).exists():
        raise BundleError(
            f"model={model}: not a model bundle (no {BUNDLE_FILE}); pass a training run folder, "
            f"its model/ folder, or runs:/<mlflow run id>"
        )
    return path


class _VerifiedFiles:
    """The bundle's files, each read once and checked against the sha256 recorded in ``bundle.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        identity = self._json(BUNDLE_FILE)
        self.identity = identity
        hashes = identity.get("files_sha256")
        if not isinstance(hashes, dict):
            raise BundleError(
                f"{path / BUNDLE_FILE}: no 'files_sha256' record, so config.yaml, meta.json and the id maps cannot "
                f"be verified (bundles exported before file hashes were recorded): export the bundle again"
            )
        unknown = sorted(set(hashes) - set(HASHED_FILES))
        if unknown:
            raise BundleError(f"{path / BUNDLE_FILE}: files_sha256 lists {unknown}; allowed: {list(HASHED_FILES)}")
        for required in (CONFIG_FILE, META_PATH):
            if required not in hashes:
                raise BundleError(f"{path / BUNDLE_FILE}: files_sha256 has no entry for {required}")
        for path_of in ID_MAP_PATHS.values():
            if (path / path_of).exists() and path_of not in hashes:
                raise BundleError(
                    f"{path / path_of}: an id map that {BUNDLE_FILE} does not list (files_sha256); a bundle's "
                    f"files must be those it was exported with"
                )
        self.hashes = {**hashes, WEIGHTS_FILE: identity.get("weights_sha256")}

    def _json(self, name: str) -> dict[str, Any]:
        file = self.path / name
        try:
            data = json.loads(file.read_bytes())
        except (OSError, ValueError) as err:
            raise BundleError(f"{file}: cannot read ({describe(err)})") from err
        if not isinstance(data, dict):
            raise BundleError(f"{file}: expected a JSON object, got {type(data).__name__}")
        return data

    def listed(self, name: str) -> bool:
        return name in self.hashes

    def read(self, name: str) -> bytes:
        """The bytes of ``name``; BundleError if missing or not the bytes ``bundle.json`` recorded."""
        file, expected = self.path / name, self.hashes.get(name)
        if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
            raise BundleError(f"{self.path / BUNDLE_FILE}: no valid sha256 recorded for {name} (got {expected!r})")
        try:
            data = file.read_bytes()
        except OSError as err:
            raise BundleError(f"{file}: missing or unreadable ({describe(err)}); the bundle is incomplete") from err
        actual = _sha256(data)
        if actual != expected:
            raise BundleError(
                f"{file}: sha256 {actual} differs from {expected} recorded in {BUNDLE_FILE} "
                f"({len(data)} bytes): the file is damaged, truncated or was replaced"
            )
        return data


def _read_meta(files: _VerifiedFiles) -> DatasetMeta:
    where, data = files.path / META_PATH, files.read(META_PATH)
    try:
        meta = DatasetMeta.from_json(data.decode(), source=str(where))
    except (UserError, UnicodeDecodeError, TypeError) as err:
        raise BundleError(f"{where}: not a dataset meta.json ({describe(err)})") from err
    for key in ("num_users", "num_items", "num_categories", "max_len"):
        value = getattr(meta, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BundleError(f"{where}: {key}={value!r}; must be a non-negative integer")
    return meta


def _read_config(files: _VerifiedFiles) -> tuple[dict[str, Any], list[TaskSpec]]:
    where, data = files.path / CONFIG_FILE, files.read(CONFIG_FILE)
    try:
        config = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise BundleError(f"{where}: not valid YAML ({describe(err)})") from err
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise BundleError(f"{where}: expected a mapping with a 'data' section")
    raw_tasks = config["data"].get("tasks")
    try:
        tasks = parse_tasks(raw_tasks) if raw_tasks else []  # [] = sequential
    except (TypeError, ValueError) as err:
        raise BundleError(f"{where}: data.tasks: {describe(err)}") from err
    return config, tasks


def _read_weights(files: _VerifiedFiles) -> dict[str, torch.Tensor]:
    where, data = files.path / WEIGHTS_FILE, files.read(WEIGHTS_FILE)
    try:
        state = load_tensors(io.BytesIO(data))
    except UnreadableTensorFile as err:  # not a torch zip, truncated, or a pickle weights_only refuses
        raise BundleError(f"{where}: not a readable weights file ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise BundleError(f"{where}: expected a state_dict (parameter name -> tensor), got {type(state).__name__}")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise BundleError(f"{where}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[:3]}); the run diverged")
    return state


def _build_model(
    files: _VerifiedFiles, config: dict[str, Any], meta: DatasetMeta, tasks: list[TaskSpec], state: dict
) -> torch.nn.Module:
    """Registered builder + backbone + tower from plain config values; shapes checked on ``meta`` first."""
    where = str(files.path / CONFIG_FILE)
    builder = registry.model_builder(
        files.identity.get("model_builder"), where=str(files.path / BUNDLE_FILE), error=BundleError
    )
    backbone = registry.factory(config.get("recsys"), "recsys", where=where, error=BundleError)
    tower = registry.factory(config["mtl"], "mtl", where=where, error=BundleError) if config.get("mtl") else None
    inputs = _Inputs(meta, tasks)

    def build() -> torch.nn.Module:
        try:
            return builder(inputs, backbone, tower, init_std=None)
        except UserError as err:
            raise BundleError(f"{where}: {err}") from err
        except (TypeError, ValueError, RuntimeError) as err:  # values of the right type the model refuses
            raise BundleError(f"{where}: cannot build the model from recsys/mtl ({describe(err)})") from err

    with torch.device("meta"):  # nothing allocated: shapes come from the config and meta.json
        shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    mismatch = shape_mismatch(shapes, state)
    if mismatch:
        raise BundleError(f"{files.path / WEIGHTS_FILE} does not match the model in its config.yaml ({mismatch})")
    model = build()
    model.load_state_dict(state)
    return model.eval()


class _Inputs:
    """What a model builder asks of a datamodule."""

    def __init__(self, meta: DatasetMeta, tasks: list[TaskSpec]) -> None:
        self.meta, self.tasks = meta, tasks

    def backbone_inputs(self) -> dict[str, Any]:
        return {"vocab": self.meta.vocab(), "max_len": self.meta.max_len}


def _read_mappers(files: _VerifiedFiles, meta: DatasetMeta) -> dict[str, IdMapper]:
    """One mapper per id column: the bundle's id map (every listed one must be present), else identity."""
    vocab = meta.vocab()
    mappers = {}
    for column, name in ID_MAP_PATHS.items():
        limit = vocab.limit(column)
        if not files.listed(name):
            mappers[column] = IdMapper(None, None, limit)
            continue
        where, data = files.path / name, files.read(name)
        try:
            frame = pl.read_parquet(io.BytesIO(data))
        except Exception as err:
            raise BundleError(f"{where}: not a readable id map ({describe(err)})") from err
        if set(frame.columns) != {"raw", "id"} or not all(frame[c].dtype.is_integer() for c in ("raw", "id")):
            raise BundleError(f"{where}: expected integer columns ['raw', 'id'], found {dict(frame.schema)}")
        raw, rows = frame["raw"].to_numpy().astype(np.int64), frame["id"].to_numpy().astype(np.int64)
        if len(rows) and (rows.min() < 1 or rows.max() > limit):
            raise BundleError(f"{where}: table rows in [{rows.min()}, {rows.max()}], outside [1, {limit}] of meta.json")
        mappers[column] = IdMapper(raw, rows, limit)
    return mappers


def load_bundle(path: Path) -> LoadedBundle:
    """Verify the bundle's files, then rebuild its model from registered parts (see the module docstring)."""
    files = _VerifiedFiles(Path(path))
    meta = _read_meta(files)
    config, tasks = _read_config(files)
    state = _read_weights(files)
    model = _build_model(files, config, meta, tasks, state)
    mappers = _read_mappers(files, meta)
    return LoadedBundle(model, config, meta, tasks, mappers, files.identity, files.hashes[WEIGHTS_FILE])
