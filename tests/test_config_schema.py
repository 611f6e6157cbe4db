"""Config values of the wrong type or out of range: one ConfigError line naming the key, the value and what is
allowed, raised by the entry points before any data is read (recsys/config_schema.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from recsys.config_schema import TRAIN_RULES, check, validate_train
from recsys.errors import ConfigError
from tests.conftest import REPO

CASES = {
    "trainer.max_epochs=abc": "trainer.max_epochs=abc: must be an integer >= 1",
    "trainer.max_epochs=1.5": "trainer.max_epochs=1.5: must be an integer >= 1",
    "trainer.max_epochs=0": "trainer.max_epochs=0: must be an integer >= 1",
    "data.batch_size=0": "data.batch_size=0: must be an integer >= 1",
    "data.batch_size=-1": "data.batch_size=-1: must be an integer >= 1",
    "data.batch_size=abc": "data.batch_size=abc: must be an integer >= 1",
    "seed=abc": "seed=abc: must be an integer in [0, 4294967295]",
    "model.init_std=-1": "model.init_std=-1: must be a number > 0 or null",
    "recsys.attention_dim=0": "recsys.attention_dim=0: must be an integer >= 1 or null",
    "mtl=mmoe mtl.num_experts=0": "mtl.num_experts=0: must be an integer >= 1",
    "mtl=mmoe mtl.dropout=1": "mtl.dropout=1: must be a number in [0, 1)",
    "recsys=sasrec recsys.moh.num_heads=0": "recsys.moh.num_heads=0: must be an integer >= 1",
    "checkpoint.every_n_steps=0": "checkpoint.every_n_steps=0: must be an integer >= 1",
}


def _compose(tmp_path, overrides: list[str], config: str = "train"):
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config, overrides=[*paths, *overrides])


@pytest.mark.parametrize("case", CASES)
def test_bad_value_is_one_line_before_any_data(case, tmp_path):
    from pipelines.train import train

    cfg = _compose(tmp_path, case.split())
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value) == CASES[case]
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "mlflow.db").exists()  # nothing touched


def test_every_shipped_config_passes(tmp_path):
    from omegaconf import OmegaConf

    for recsys in ("dare", "din", "twin", "twin_4e", "twin_proj", "sasrec", "mqsa_ted"):
        check(OmegaConf.to_container(_compose(tmp_path, [f"recsys={recsys}"]), resolve=True), TRAIN_RULES)
    for mtl in ("esmm", "mmoe", "ple", "shared_bottom", "single", "switch", "taskexpert"):
        cfg = _compose(tmp_path, [f"mtl={mtl}", "data=ml100k_mtl"])
        check(OmegaConf.to_container(cfg, resolve=True), TRAIN_RULES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_trainer_without_a_gpu(tmp_path):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu: no CUDA GPU is visible"):
        validate_train(OmegaConf.to_container(_compose(tmp_path, ["trainer=gpu"]), resolve=True))


@pytest.mark.parametrize("value, message", [("-1", "threads=-1: must be an integer >= 1 or null"), ("abc", None)])
def test_scoring_threads(value, message, tmp_path):
    from pipelines.score import run

    cfg = _compose(tmp_path, ["input=in", "model=m", f"output={tmp_path}/out", f"threads={value}"], "score")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(err.value) == (message or f"threads={value}: must be an integer >= 1 or null")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipelines.train", f"paths.root_dir={tmp_path}", "trainer.max_epochs=abc"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: ConfigError: trainer.max_epochs=abc: must be an integer >= 1"]
