"""MLflow wiring: the logger, run names, flattened params, tags."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pytorch_lightning.loggers import MLFlowLogger

from recsys.errors import ConfigError


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON strings (MLflow params are flat strings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat


# leaf keys whose values are locations on this machine: tags (``path.<key>``), not params, so the UI's compare
# view (parallel coordinates) shows what was trained, not where its files went
PATH_KEYS = (
    "path",
    "dir",
    "dirpath",
    "cache_dir",
    "output_dir",
    "root_dir",
    "log_dir",
    "tracking_uri",
    "artifact_location",
)


def params_and_path_tags(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A resolved run config -> (MLflow params: model, data, trainer, ... settings a person compares,
    tags ``path.<key>``: every machine path in it -- the ``paths`` section and ``*path`` / ``*_dir`` / store keys)."""
    params, tags = {}, {}
    for key, value in flatten(config).items():
        leaf = key.rsplit(".", 1)[-1]
        if key.startswith("paths.") or leaf in PATH_KEYS or leaf.endswith("_dir"):
            tags[f"path.{key}"] = str(value)
        else:
            params[key] = value
    return params, tags


# the experiment tag the MLflow UI (>= 3) reads to open an experiment in its model-training view; without it
# the UI may infer a GenAI experiment and show runs as "Evaluations"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def mark_model_training(client: Any, experiment_id: str | None) -> None:
    """Tag the experiment as model training (idempotent); ``experiment_id`` None (a non-zero rank) does nothing."""
    if experiment_id is not None:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def config_hash(config: Mapping[str, Any], length: int = 8) -> str:
    """Short stable hash of a resolved config (run names, cache keys)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# keys that do not change what is trained: left out of the run's config hash
VOLATILE_KEYS = ("paths", "resume", "run_name")


def experiment_hash(config: Mapping[str, Any]) -> str:
    """Hash of what defines a run's results: the config without paths / resume / run name, and with the run's
    own folder (``paths.output_dir``, which e.g. configs/callbacks/ interpolate) replaced by a placeholder."""
    blob = json.dumps({k: v for k, v in config.items() if k not in VOLATILE_KEYS}, sort_keys=True, default=str)
    output_dir = str((config.get("paths") or {}).get("output_dir") or "")
    if output_dir:
        blob = blob.replace(json.dumps(output_dir)[1:-1], "<output_dir>")
    return config_hash(json.loads(blob))


def run_name(recsys: str, mtl: str | None, data: str, config: Mapping[str, Any]) -> str:
    """``<recsys>[-<mtl>]-<data>-<short hash>``; the mtl part is left out for the single-task tower."""
    parts = [recsys] + ([mtl] if mtl and mtl != "single" else []) + [data, experiment_hash(config)]
    return "-".join(parts)


def git_commit(root: Path) -> str:
    """Current commit of the checkout, or ``unknown`` outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_store_writable(tracking_uri: str) -> None:
    """For a local sqlite store, create its folder and fail early with a clear message if it is not writable."""
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"MLflow tracking store folder {folder} cannot be created: {err}") from err
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"MLflow tracking store folder {folder} is not writable")


def check_tracking_uri(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the URI named, where MLflow itself would retry for minutes: an ``http(s)://``
    tracking server must answer (any HTTP status) within ``timeout`` seconds; a sqlite store must be writable."""
    ensure_store_writable(tracking_uri)
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered (an auth wall or a proxy's status page still means it is reachable)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):
            return  # it answered TLS (e.g. a self-signed certificate MLflow is told to accept)
        raise ConfigError(
            f"MLflow tracking server {tracking_uri} (logger.tracking_uri / MLFLOW_TRACKING_URI) does not answer "
            f"within {timeout:g} s ({reason}); start it, or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from None


def build_logger(
    tracking_uri: str,
    artifact_location: str,
    experiment_name: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> MLFlowLogger:
    """An :class:`MLFlowLogger` on an explicit store (MLflow >= 3.13 refuses the implicit file store)."""
    check_tracking_uri(tracking_uri)
    if urlparse(artifact_location).scheme in ("", "file"):  # a local folder (else e.g. mlflow-artifacts:/, s3://)
        artifact_location = str(Path(artifact_location.removeprefix("file://")).resolve())
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name,
        tracking_uri=tracking_uri,
        tags=tags,
        artifact_location=artifact_location,
        run_id=run_id,
        log_model=False,
    )


def log_config_files(logger: MLFlowLogger, config: Mapping[str, Any], dataset_meta: Mapping[str, Any]) -> None:
    """The resolved run config and the dataset's ``meta.json`` as ``config/config.yaml`` and
    ``config/dataset_meta.json`` artifacts of the logger's run (call on rank 0)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
        (folder / "dataset_meta.json").write_text(json.dumps(dict(dataset_meta), indent=2))
        logger.experiment.log_artifacts(logger.run_id, str(folder), "config")
