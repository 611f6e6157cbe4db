"""Untrusted model bundles and checkpoints: nothing in them runs code or writes files, and every damaged one
stops with one line naming the file (``BundleError`` / ``CheckpointError``).

Hostile payloads here are harmless: each would create a marker file in ``tmp_path`` if it ran, and every
test asserts the marker does not exist.
"""

from __future__ import annotations

import hashlib
import io
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
from recsys.bundle import export_bundle, load_bundle, resolve_bundle
from recsys.errors import BundleError, CheckpointError, ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
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
        (  # YAML's non-plain scalars
            lambda c, m: c["recsys"].update(top_k=__import__("datetime").date(2020, 1, 1)),
            r"recsys\.top_k holds a date; allowed: str, int, float, bool, null, lists, mappings",
        ),
    ],
    ids=["nested-target", "args", "partial-false", "unknown-keyword", "date"],
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


# ---- 2. every file checked against bundle.json before use ------------------------------------------------


@pytest.mark.parametrize("name", ["weights.pt", "config.yaml", "dataset/meta.json", "dataset/id_map_item.parquet"])
def test_a_changed_file_is_refused_by_its_hash(bundle, name):
    data = (bundle / name).read_bytes()
    (bundle / name).write_bytes(data[: len(data) // 2])  # truncated (a partial copy or download)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert _one_line(err).startswith(f"{bundle / name}: sha256 {_sha(data[: len(data) // 2])} differs from")
    assert "damaged, truncated or was replaced" in str(err.value)


def test_an_id_map_bundle_json_does_not_list_is_refused(bundle):
    frame = pl.DataFrame({"raw": [5, 6], "id": [1, 2]})
    frame.write_parquet(bundle / "dataset" / "id_map_user.parquet")
    with pytest.raises(BundleError, match=r"id_map_user\.parquet: an id map that bundle\.json does not list"):
        load_bundle(bundle)


def test_a_bundle_without_file_hashes_is_refused(bundle):
    identity = json.loads((bundle / "bundle.json").read_text())
    del identity["files_sha256"]
    (bundle / "bundle.json").write_text(json.dumps(identity))
    with pytest.raises(BundleError, match=r"bundle\.json: no 'files_sha256' record.*export the bundle again"):
        load_bundle(bundle)


@pytest.mark.parametrize("listed", ["../../outside.txt", "weights.pt"])
def test_files_sha256_may_list_only_bundle_files(bundle, listed):
    identity = json.loads((bundle / "bundle.json").read_text())
    identity["files_sha256"][listed] = "0" * 64
    (bundle / "bundle.json").write_text(json.dumps(identity))
    with pytest.raises(BundleError, match=r"files_sha256 lists \[.*\]; allowed: \['config\.yaml'"):
        load_bundle(bundle)


def test_the_recorded_weights_hash_must_be_a_sha256(bundle):
    _edit_identity(bundle, weights_sha256=None)
    with pytest.raises(BundleError, match=r"bundle\.json: no valid sha256 recorded for weights\.pt \(got None\)"):
        load_bundle(bundle)


# ---- 4. damaged bundles: one line each, never silent ------------------------------------------------------


class _Payload:
    """Pickles into a call that would create ``marker`` if anything unpickled it without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_truncated_weights_with_a_matching_hash_are_refused(bundle):
    _replace(bundle, "weights.pt", (bundle / "weights.pt").read_bytes()[:1000])
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert _one_line(err).startswith(f"{bundle / 'weights.pt'}: not a readable weights file")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickle", "torch-object", "not-a-state-dict", "text"])
def test_a_weights_file_that_is_not_weights_is_refused_without_running(bundle, tmp_path, kind):
    import pickle

    marker = tmp_path / "marker.txt"
    buffer = io.BytesIO()
    if kind == "pickle":
        pickle.dump({"w": _Payload(marker)}, buffer)
    elif kind == "torch-object":
        torch.save({"w": _Payload(marker)}, buffer)
    elif kind == "not-a-state-dict":
        torch.save([torch.zeros(2)], buffer)
    else:
        buffer.write(b"weights: none\n")
    _replace(bundle, "weights.pt", buffer.getvalue())
    with pytest.raises(BundleError, match=r"weights\.pt: (not a readable weights file|expected a state_dict)") as err:
        load_bundle(bundle)
    _one_line(err)
    assert not marker.exists()


def test_a_missing_id_map_is_refused_not_scored_as_raw_ids(bundle):
    (bundle / "dataset" / "id_map_item.parquet").unlink()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert _one_line(err).startswith(f"{bundle / 'dataset' / 'id_map_item.parquet'}: missing or unreadable")
    assert "the bundle is incomplete" in str(err.value)


def test_an_id_map_pointing_outside_the_tables_is_refused(bundle):
    buffer = io.BytesIO()
    pl.DataFrame({"raw": [1, 2], "id": [1, NUM_ITEMS + 5]}).write_parquet(buffer)
    _replace(bundle, "dataset/id_map_item.parquet", buffer.getvalue())
    with pytest.raises(BundleError, match=rf"id_map_item\.parquet: table rows in \[1, {NUM_ITEMS + 5}\], outside"):
        load_bundle(bundle)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bundle, value):
    state = torch.load(bundle / "weights.pt", weights_only=True)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key].view(-1)[0] = value
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _replace(bundle, "weights.pt", buffer.getvalue())
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert _one_line(err) == (
        f"{bundle / 'weights.pt'}: 1 tensors hold NaN or infinite values (e.g. ['{key}']); the run diverged"
    )


def test_a_huge_vocabulary_in_meta_json_allocates_nothing(bundle):
    """Shapes are compared on the ``meta`` device first: 10^12 items would need terabytes."""
    meta = json.loads((bundle / "dataset" / "meta.json").read_text())
    _replace(bundle, "dataset/meta.json", json.dumps({**meta, "num_items": 10**12}).encode())
    with pytest.raises(BundleError, match=r"weights\.pt does not match the model in its config\.yaml \(0 missing"):
        load_bundle(bundle)


@pytest.mark.parametrize("value", [-1, "50", 1.5])
def test_meta_json_sizes_must_be_non_negative_integers(bundle, value):
    meta = json.loads((bundle / "dataset" / "meta.json").read_text())
    _replace(bundle, "dataset/meta.json", json.dumps({**meta, "num_items": value}).encode())
    with pytest.raises(BundleError, match=rf"meta\.json: num_items={value!r}; must be a non-negative integer"):
        load_bundle(bundle)


def test_an_unknown_mlflow_run_is_one_line(tmp_path):
    with pytest.raises(BundleError) as err:
        resolve_bundle("runs:/0123456789abcdef0123456789abcdef", tmp_path / "download")
    message = _one_line(err)
    assert message.startswith("model=runs:/0123456789abcdef0123456789abcdef: cannot download the run's model bundle")
    assert "check the run id and MLFLOW_TRACKING_URI" in message


def test_a_folder_that_is_not_a_bundle_is_one_line(tmp_path):
    with pytest.raises(BundleError, match=r"not a model bundle \(no bundle\.json\)"):
        resolve_bundle(str(tmp_path), tmp_path / "download")


# ---- 3. sharded (DCP) checkpoint folders: metadata read with an allow-list ---------------------------------


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, torch.nn.Module]:
    from recsys.distributed import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    ckpt.save_sharded({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt", model


def _hostile_metadata(folder: Path, marker: Path, nested: bool) -> None:
    import pickle

    if nested:  # the real metadata object, with the payload hidden in one of its fields
        with open(folder / ".metadata", "rb") as handle:
            metadata = pickle.load(handle)
        metadata.planner_data = {"x": _Payload(marker)}
    else:
        metadata = _Payload(marker)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("nested", [False, True], ids=["payload", "payload-inside-metadata"])
def test_a_hostile_dcp_metadata_does_not_run(sharded, tmp_path, nested):
    import pickle

    from recsys.distributed import checkpoint as ckpt

    folder, model = sharded
    marker = tmp_path / "marker.txt"
    _hostile_metadata(folder, marker, nested)
    with pytest.raises(CheckpointError) as err:
        ckpt.load_sharded(folder, model.state_dict())
    assert _one_line(err) == (
        f"{folder}: refusing to read .metadata: it names pathlib.Path.write_text, which is not DCP metadata "
        f"(a checkpoint folder holds DCP metadata and tensors only)"
    )
    assert not marker.exists()
    pickle.loads((folder / ".metadata").read_bytes())  # control: plain pickle (torch's own reader) runs it
    assert marker.read_text() == "pwned"


def test_the_safe_reader_is_what_dcp_uses(sharded, tmp_path, monkeypatch):
    from recsys.distributed import checkpoint as ckpt
    from recsys.distributed.dcp_reader import SafeFileSystemReader

    folder, model = sharded
    calls = []
    read = SafeFileSystemReader.read_metadata
    monkeypatch.setattr(SafeFileSystemReader, "read_metadata", lambda self, *a, **k: calls.append(1) or read(self))
    ckpt.load_sharded(folder, model.state_dict())  # a clean folder loads, through the safe reader
    assert calls
    _hostile_metadata(folder, tmp_path / "marker.txt", nested=True)
    with pytest.raises(CheckpointError, match="refusing to read .metadata"):
        SafeFileSystemReader(folder).read_metadata()
    assert not (tmp_path / "marker.txt").exists()


def test_pickled_objects_in_a_dcp_folder_are_never_loaded(tmp_path):
    """DCP stores non-tensors as pickles it loads with ``weights_only=False``: a folder that lists one for a
    tensor the model has is refused before any data is read."""
    import torch.distributed.checkpoint as dcp

    from recsys.distributed import checkpoint as ckpt

    model, marker, folder = torch.nn.Linear(3, 2), tmp_path / "marker.txt", tmp_path / "last.ckpt"
    ckpt.save_sharded({"state_dict": model.state_dict()}, folder)
    (folder / ".metadata").unlink()
    dcp.save({"state_dict": {"weight": _Payload(marker), "bias": torch.zeros(2)}}, checkpoint_id=str(folder))
    with pytest.raises(CheckpointError) as err:
        ckpt.load_sharded(folder, model.state_dict())
    assert "lists 1 non-tensor entries (e.g. ['state_dict.weight'])" in _one_line(err)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["truncated-metadata", "hostile-trainer-state", "truncated-trainer-state"])
def test_damaged_dcp_folders_are_one_line(sharded, tmp_path, damage):
    import pickle

    from recsys.distributed import checkpoint as ckpt

    folder, model = sharded
    marker = tmp_path / "marker.txt"
    if damage == "truncated-metadata":
        data = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(data[: len(data) // 2])
        expected = f"{folder}: cannot read .metadata (truncated or corrupt?)"
    elif damage == "hostile-trainer-state":
        (folder / ckpt.TRAINER_STATE).write_bytes(pickle.dumps({"format": _Payload(marker)}))
        expected = f"{folder / ckpt.TRAINER_STATE}: cannot read (truncated, corrupt or unsafe?)"
    else:
        data = (folder / ckpt.TRAINER_STATE).read_bytes()
        (folder / ckpt.TRAINER_STATE).write_bytes(data[:100])
        expected = f"{folder / ckpt.TRAINER_STATE}: cannot read (truncated, corrupt or unsafe?)"
    with pytest.raises(CheckpointError) as err:
        ckpt.load_sharded(folder, model.state_dict())
    assert _one_line(err).startswith(expected)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_hostile_lightning_checkpoint_does_not_run(tmp_path):
    """``resume=<file>``: checked with ``weights_only=True`` before Lightning (also ``weights_only=True``) reads it."""
    from recsys.tracking.resume import check_checkpoint

    marker, path = tmp_path / "marker.txt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": _Payload(marker)}}, path)
    with pytest.raises((ValueError, CheckpointError), match=rf"resume={path}: cannot read the checkpoint"):
        check_checkpoint(str(path), torch.nn.Linear(3, 2))
    assert not marker.exists()


def test_yaml_tags_in_config_yaml_are_not_constructed(bundle, tmp_path):
    marker = tmp_path / "marker.txt"
    text = f'recsys: !!python/object/apply:pathlib.Path.write_text ["{marker}", "pwned"]\ndata: {{}}\n'
    _replace(bundle, "config.yaml", text.encode())
    with pytest.raises(BundleError, match=r"config\.yaml: not valid YAML \(ConstructorError") as err:
        load_bundle(bundle)
    _one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("relative", ["../../outside.distcp", "/etc/hostname", ".."])
def test_dcp_metadata_may_point_only_at_files_in_its_folder(sharded, relative):
    import dataclasses
    import pickle

    from recsys.distributed import checkpoint as ckpt

    folder, model = sharded
    with open(folder / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    storage = metadata.storage_data
    metadata.storage_data = {k: dataclasses.replace(v, relative_path=relative) for k, v in storage.items()}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError) as err:
        ckpt.load_sharded(folder, model.state_dict())
    assert f"points at data files outside the folder or of unknown form (e.g. ['{relative}'])" in _one_line(err)
