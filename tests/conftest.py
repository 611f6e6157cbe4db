import os
from pathlib import Path

import pytest

import pipelines._cli  # noqa: F401  (registers ${recsys_cwd:}, which configs/paths/default.yaml uses)

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """../shared/data beside the checkout (CI clones with shared/ beside it), or $RECSYS_SHARED_DATA."""
    env = os.environ.get("RECSYS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """No test writes a tracking store into the repo."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("RECSYS_SHARED_DATA", str(shared_data()))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (not failed) where ``torch.cuda.is_available()`` is False."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
