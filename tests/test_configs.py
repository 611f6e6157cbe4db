"""Config composition: every group option composes, overrides land, bad names/keys fail clearly."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from recsys.data.schema import Vocab
from recsys.models.target_attention import TargetAttentionBackbone
from tests.conftest import REPO

CONFIGS = str(REPO / "configs")
RECSYS = ["dare", "twin", "twin_4e", "twin_proj", "din"]


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("name", RECSYS)
def test_each_recsys_option_builds_its_backbone(name):
    cfg = _compose([f"recsys={name}"])
    backbone = instantiate(cfg.recsys)(vocab=Vocab(5, 30, 4), max_len=10)
    assert isinstance(backbone, TargetAttentionBackbone)
    assert (backbone.att_tokens is not None) == (name in ("dare", "twin_4e"))
    assert bool(backbone.projections) == (name == "twin_proj")
    assert (backbone.repr_tokens.pos_dim == 0) == (name == "din")


def test_one_override_each():
    cfg = _compose(
        ["recsys=dare", "recsys.attention_dim=8", "trainer.max_epochs=7", "data=ml100k", "data.path=/somewhere/ml-100k"]
    )
    assert cfg.recsys.attention_dim == 8 and cfg.trainer.max_epochs == 7
    assert cfg.data.source.path == "/somewhere/ml-100k"
    backbone = instantiate(cfg.recsys)(vocab=Vocab(5, 30, 4), max_len=10)
    assert {p.shape[1] for n, p in backbone.named_parameters() if n.startswith("att_tokens.tables")} == {8}


@pytest.mark.parametrize("data", ["synthetic", "ml100k", "taobao"])
def test_data_options_compose(data):
    cfg = _compose([f"data={data}"])
    assert cfg.data.name == data and cfg.data.tasks[0].name == "click"


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="nope"):
        _compose(["recsys.nope=1"])


def test_unknown_group_option_is_rejected():
    with pytest.raises(ConfigCompositionException, match="recsys/transformer"):
        _compose(["recsys=transformer"])


@pytest.mark.e2e
def test_cli_unknown_recsys_name_gives_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "recsys=nope", f"paths.root_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Could not find 'recsys/nope'" in proc.stderr
    assert "dare" in proc.stderr  # lists the available options
    assert "Traceback" not in proc.stderr


def test_callbacks_are_a_config_group_and_each_can_be_switched_off(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from pipelines.train import build_callbacks
    from recsys.tracking.gates import GateUsage
    from recsys.tracking.resume import PeriodicCheckpoint

    base = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", "run_name=r"]
    kinds = {type(c).__name__ for c in build_callbacks(_compose(base))}
    assert kinds == {"ModelCheckpoint", "PeriodicCheckpoint", "MLflowRunFiles", "EpochTimer", "GateUsage"}
    callbacks = build_callbacks(_compose([*base, "callbacks.gate_usage=null", "callbacks.model_checkpoint=null"]))
    assert not any(isinstance(c, (GateUsage, ModelCheckpoint)) for c in callbacks)
    periodic = next(c for c in callbacks if isinstance(c, PeriodicCheckpoint))
    assert periodic.path == f"{tmp_path}/run/checkpoints/last.ckpt"
    # a recsys option still adds its own (sasrec: early stopping on its monitor), on top of the defaults
    sasrec = build_callbacks(_compose([*base, "recsys=sasrec"]))
    stop = next(c for c in sasrec if isinstance(c, EarlyStopping))
    assert stop.monitor == "val/ndcg@20" and any(isinstance(c, GateUsage) for c in sasrec)
