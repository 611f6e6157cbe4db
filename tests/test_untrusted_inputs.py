"""Untrusted model bundles and checkpoints: nothing in them runs code or writes files, and every damaged one
stops with one line naming the file (``BundleError`` / ``CheckpointError``).

Hostile payloads here are harmless: each would create a marker file in ``tmp_path`` if it ran, and every
test asserts the marker does not exist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys import registry
from recsys.bundle import export_bundle, load_bundle
from recsys.errors import BundleError, ConfigError
from tests.conftest import REPO

NUM_USERS, NUM_ITEMS, NUM_CATEGORIES, MAX_LEN = 20, 50, 6, 12
RANKING_BUILDER = "recsys.models.ranking.build_ranking_model"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---- a tiny bundle, made the way training makes one --------------------------------------------------


def _dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    meta = {
        "name": "tiny",
        "fingerprint": "f",
        "num_users": NUM_USERS,
        "num_items": NUM_ITEMS,
        "num_categories": NUM_CATEGORIES,
        "max_len": MAX_LEN,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    raw = np.arange(1, NUM_ITEMS + 1, dtype=np.int64) * 1000 + 7  # raw item ids far from the table rows
    pl.DataFrame({"raw": raw, "id": np.arange(1, NUM_ITEMS + 1)}).write_parquet(folder / "id_map_item.parquet")
    return folder


def _config() -> dict:
    twin = yaml.safe_load((REPO / "configs" / "recsys" / "twin.yaml").read_text())
    return {
        "recsys": {**twin, "embedding_dim": 8, "top_k": 4, "aux_hidden": [8]},
        "mtl": {"_target_": "mtl.single.SingleTower", "_partial_": True, "hidden": [8]},
        "data": {"tasks": [{"name": "click", "label": "label"}]},
        # recorded, never built: the loader reads recsys, mtl and data.tasks only
        "trainer": {"_target_": "pytorch_lightning.Trainer", "max_epochs": 1},
    }


def _build(config: dict) -> torch.nn.Module:
    from mtl.spec import parse_tasks
    from recsys.data.vocab import Vocab

    class Inputs:
        tasks = parse_tasks(config["data"]["tasks"])

        @staticmethod
        def backbone_inputs():
            return {"vocab": Vocab(NUM_USERS, NUM_ITEMS, NUM_CATEGORIES), "max_len": MAX_LEN}

    torch.manual_seed(0)
    backbone = registry.factory(config["recsys"], "recsys")
    tower = registry.factory(config["mtl"], "mtl")
    return registry.model_builder(RANKING_BUILDER)(Inputs(), backbone, tower)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bundle")
    config = _config()
    identity = {"run_name": "tiny", "run_id": "r1", "model_builder": RANKING_BUILDER}
    return export_bundle(tmp / "model", config, _dataset(tmp / "dataset"), _build(config), identity)


@pytest.fixture
def bundle(source, tmp_path) -> Path:
    """A fresh copy of the tiny bundle, to damage."""
    import shutil

    return Path(shutil.copytree(source, tmp_path / "model"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replace(bundle: Path, name: str, data: bytes) -> None:
    """Replace a file *and* its recorded hash (as a hostile author would), so the hash check passes."""
    (bundle / name).write_bytes(data)
    identity = json.loads((bundle / "bundle.json").read_text())
    if name == "weights.pt":
        identity["weights_sha256"] = _sha(data)
    else:
        identity["files_sha256"][name] = _sha(data)
    (bundle / "bundle.json").write_text(json.dumps(identity))


def _edit_config(bundle: Path, edit) -> None:
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    edit(config)
    _replace(bundle, "config.yaml", yaml.safe_dump(config).encode())


def _edit_identity(bundle: Path, **changes) -> None:
    identity = json.loads((bundle / "bundle.json").read_text())
    identity.update(changes)
    (bundle / "bundle.json").write_text(json.dumps(identity))


def test_a_clean_bundle_loads_and_exposes_its_verified_hash(source):
    loaded = load_bundle(source)
    recorded = json.loads((source / "bundle.json").read_text())
    assert loaded.weights_sha256 == recorded["weights_sha256"] == _sha((source / "weights.pt").read_bytes())
    assert sorted(recorded["files_sha256"]) == ["config.yaml", "dataset/id_map_item.parquet", "dataset/meta.json"]
    assert not loaded.model.training
    expected = _build(_config()).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
    rows = loaded.mappers["item"](np.array([1007, 50007, 3, 999_999], dtype=np.int64))
    assert rows.tolist() == [1, 50, -1, -1]


# ---- 1. nothing in a bundle names code to run ----------------------------------------------------------

HOSTILE_TARGETS = ["pathlib.Path.write_text", "builtins.open", "os.system", "mtl.single.SingleTower"]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_backbone_target_outside_the_registry_is_refused(bundle, tmp_path, target):
    marker = tmp_path / "marker.txt"

    def edit(config):
        config["recsys"] = {"_target_": target, "_partial_": False, "_args_": [str(marker), "pwned"]}
        config["recsys"].update({"self": str(marker), "data": "pwned", "file": str(marker), "mode": "w"})

    _edit_config(bundle, edit)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    message = _one_line(err)
    assert f"{bundle / 'config.yaml'}: recsys._target_='{target}' is not one of the package's backbones" in message
    assert "recsys.models.sasrec.SASRec" in message  # the allowed names
    assert not marker.exists()


@pytest.mark.parametrize("target", ["pathlib.Path.write_text", "builtins.open", "recsys.models.sasrec.SASRec"])
def test_tower_target_outside_the_registry_is_refused(bundle, tmp_path, target):
    marker = tmp_path / "marker.txt"
    _edit_config(bundle, lambda c: c.update(mtl={"_target_": target, "self": str(marker), "data": "pwned"}))
    with pytest.raises(BundleError, match=r"config\.yaml: mtl\._target_=.* is not one of the package's task towers"):
        load_bundle(bundle)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (  # a nested _target_ (Hydra would build it recursively)
            lambda c, m: c["recsys"].update(aux_hidden={"_target_": "pathlib.Path.write_text", "self": m}),
            r"recsys\.aux_hidden\._target_: nested Hydra keys are not allowed",
        ),
        (  # Hydra options
            lambda c, m: c["recsys"].update(_args_=[m, "pwned"]),
            r"recsys\._args_: not allowed; the only special keys are \['_target_', '_partial_'\]",
        ),
        (
            lambda c, m: c["mtl"].update(_partial_=False),
            r"mtl\._partial_=False: must be true",
        ),
        (  # a keyword the registered class does not take
            lambda c, m: c["recsys"].update(path=m),
            r"recsys\.path: recsys\.models\.target_attention\.TargetAttentionBackbone takes no such parameter",
        ),
    ],
    ids=["nested-target", "args", "partial-false", "unknown-keyword"],
)
def test_only_plain_values_reach_a_registered_class(bundle, tmp_path, edit, message):
    marker = str(tmp_path / "marker.txt")
    _edit_config(bundle, lambda c: edit(c, marker))
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(bundle)
    _one_line(err)
    assert not (tmp_path / "marker.txt").exists()


def test_other_sections_are_never_built(bundle, tmp_path):
    """``trainer``, ``callbacks``, ... are a record of the run: a ``_target_`` there is text, not code."""
    marker = tmp_path / "marker.txt"
    _edit_config(
        bundle, lambda c: c.update(callbacks={"x": {"_target_": "pathlib.Path.write_text", "self": str(marker)}})
    )
    load_bundle(bundle)
    assert not marker.exists()


@pytest.mark.parametrize("builder", ["os.system", "pathlib.Path.write_text", "recsys.training.ranking.RankingModule"])
def test_model_builder_outside_the_registry_is_refused(bundle, builder):
    _edit_identity(bundle, model_builder=builder)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert _one_line(err).startswith(f"{bundle / 'bundle.json'}: model_builder='{builder}' is not one of the package")
    assert RANKING_BUILDER in str(err.value)


def _compose(override: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[override])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "recsys").glob("*.yaml")))
def test_every_recsys_config_is_registered(name):
    cfg = _compose(f"recsys={name}")
    backbone = registry.factory(OmegaConf.to_container(cfg.recsys, resolve=True), "recsys")
    assert backbone.func in registry.BACKBONES.values()
    if cfg.get("mtl"):
        assert registry.factory(OmegaConf.to_container(cfg.mtl, resolve=True), "mtl").func in registry.TOWERS.values()


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "mtl").glob("*.yaml")))
def test_every_mtl_config_is_registered(name):
    cfg = _compose(f"mtl={name}")
    assert registry.factory(OmegaConf.to_container(cfg.mtl, resolve=True), "mtl").func in registry.TOWERS.values()


def test_every_training_module_builder_is_registered():
    from recsys.training import ranking, sequential

    for module in (ranking, sequential):
        assert registry.model_builder(module.MODEL_BUILDER) is not None


def test_training_refuses_an_unregistered_target_before_touching_data():
    from pipelines.train import build

    cfg = _compose("recsys=twin")
    cfg.recsys._target_ = "pathlib.Path.write_text"
    cfg.data._target_ = "tests.no_such_module.DataModule"  # would raise another error if reached
    with pytest.raises(ConfigError, match=r"config: recsys\._target_='pathlib\.Path\.write_text' is not one of"):
        build(cfg)


@pytest.mark.parametrize("name", ["sasrec", "mqsa_ted"])
def test_sequential_bundles_round_trip(name, tmp_path):
    """Sequential bundles rebuild through the registry too (shapes checked on ``meta`` first)."""
    from recsys.data.vocab import Vocab

    recsys = OmegaConf.to_container(_compose(f"recsys={name}").recsys, resolve=True)
    config = {"recsys": {**recsys, "dim": 8}, "mtl": None, "data": {"name": "tiny"}}

    class Inputs:
        tasks: list = []

        @staticmethod
        def backbone_inputs():
            return {"vocab": Vocab(NUM_USERS, NUM_ITEMS, NUM_CATEGORIES), "max_len": MAX_LEN}

    builder = "recsys.models.sequential.build_sequential_model"
    model = registry.model_builder(builder)(Inputs(), registry.factory(config["recsys"], "recsys"), None)
    bundle = export_bundle(
        tmp_path / "model", config, _dataset(tmp_path / "dataset"), model, {"run_name": name, "model_builder": builder}
    )
    loaded = load_bundle(bundle)
    assert type(loaded.model) is type(model) and loaded.tasks == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
