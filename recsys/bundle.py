"""Model bundle: everything a scoring job needs from a training run, in one folder.

    <bundle>/config.yaml            resolved training config (recsys, mtl, data.tasks, ...)
    <bundle>/dataset/meta.json      vocabulary sizes, max_len, data fingerprint
    <bundle>/dataset/id_map_*.parquet   raw id -> table row, per id column (absent = raw ids kept)
    <bundle>/weights.pt             model state_dict (tensors only; loaded with weights_only=True)
    <bundle>/bundle.json            identity: run name, run id, weights sha256

Training writes it atomically to ``<run dir>/model`` and logs it to MLflow as the artifact folder ``model``.
"""

from __future__ import annotations

import hashlib
import io
import os
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
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl.spec import TaskSpec, parse_tasks
from recsys.data.cache import DatasetMeta, load_meta
from recsys.errors import BundleError
from recsys.io import atomic_write_bytes, write_json_atomic

ID_COLUMNS = ("user", "item", "category")


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
            if path.name == "meta.json" or path.name.startswith("id_map_"):
                shutil.copy2(path, tmp / "dataset" / path.name)
        atomic_write_bytes(tmp / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False).encode())
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        weights = buffer.getvalue()
        atomic_write_bytes(tmp / "weights.pt", weights)
        write_json_atomic(tmp / "bundle.json", {**identity, "weights_sha256": hashlib.sha256(weights).hexdigest()})
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


@dataclass
class LoadedBundle:
    """A bundle read back: the model in eval mode plus what is needed to feed it."""

    model: torch.nn.Module
    config: dict[str, Any]
    meta: DatasetMeta
    tasks: list[TaskSpec]
    mappers: dict[str, IdMapper]
    identity: dict[str, Any]

    def backbone_inputs(self) -> dict[str, Any]:
        return {"vocab": self.meta.vocab(), "max_len": self.meta.max_len}


def resolve_bundle(model: str, download_dir: Path) -> Path:
    """A bundle folder, a run folder holding ``model/``, or ``runs:/<run_id>`` (downloaded from MLflow)."""
    if model.startswith("runs:/"):
        import mlflow

        run_id = model[len("runs:/") :].strip("/").split("/")[0]
        return Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(download_dir))
        )
    path = Path(model)
    if (path / "model" / "bundle.json").exists():
        path = path / "model"
    if not (path / "bundle.json").exists():
        raise BundleError(
            f"{model}: not a model bundle (no bundle.json); pass a training run folder, "
            f"its model/ folder, or runs:/<mlflow run id>"
        )
    return path


def load_bundle(path: Path) -> LoadedBundle:
    """Rebuild the model from the bundle's config with the same Hydra factories as training."""
    import importlib
    import json

    path = Path(path)
    config = yaml.safe_load((path / "config.yaml").read_text())
    meta = load_meta(path / "dataset")
    tasks = parse_tasks(config["data"]["tasks"]) if config["data"].get("tasks") else []  # [] = sequential
    cfg = OmegaConf.create(config)

    class _Inputs:  # what the model builder asks of a datamodule
        def __init__(self) -> None:
            self.tasks = tasks

        @staticmethod
        def backbone_inputs() -> dict[str, Any]:
            return {"vocab": meta.vocab(), "max_len": meta.max_len}

    identity = json.loads((path / "bundle.json").read_text())
    # the builder the training module used, importable without Lightning
    module_name, _, function = identity["model_builder"].rpartition(".")
    builder = getattr(importlib.import_module(module_name), function)
    tower = instantiate(cfg.mtl) if cfg.get("mtl") is not None else None
    model = builder(_Inputs(), instantiate(cfg.recsys), tower, init_std=None)
    state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise BundleError(f"{path}/weights.pt does not match the model in its config.yaml: {err}") from err
    model.eval()
    vocab = meta.vocab()
    mappers = {}
    for column in ID_COLUMNS:
        file = path / "dataset" / f"id_map_{column}.parquet"
        if file.exists():
            frame = pl.read_parquet(file)
            mappers[column] = IdMapper(frame["raw"].to_numpy(), frame["id"].to_numpy(), vocab.limit(column))
        else:
            mappers[column] = IdMapper(None, None, vocab.limit(column))
    return LoadedBundle(model, config, meta, tasks, mappers, identity)
