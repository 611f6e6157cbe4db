"""Tabular multi-task data (census, the tiny samples), the fields backbone, task-config errors, ml100k `like`,
config composition of every mtl option and clear errors for incompatible pieces."""

import json
from functools import partial

import numpy as np
import polars as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mtl.spec import parse_tasks
from recsys.data.cache import load_meta
from recsys.data.census import prepare_census
from recsys.data.movielens import prepare_ml100k
from recsys.data.mtl_samples import prepare_ali_ccp, prepare_aliexpress, prepare_byterec
from recsys.data.schema import DataValidationError, Vocab
from recsys.data.tabular import TabularDataModule, encode_tabular, write_tabular
from recsys.models.fields import FieldsBackbone
from recsys.models.ranking import build_ranking_model
from recsys.training.ranking import RankingModule
from tests.conftest import REPO, shared_data
from tests.helpers import fit_one_batch

CENSUS = shared_data() / "mtl" / "census_kdd"
CENSUS_TASKS = [{"name": "income", "label": "income"}, {"name": "marital", "label": "never_married"}]


def census_module(cache, tasks=CENSUS_TASKS, **kwargs):
    source = partial(prepare_census, CENSUS / "census-income.test.gz", CENSUS / "split_seed2026")
    return TabularDataModule("census", source, str(cache), tasks=tasks, **kwargs)


@pytest.fixture(scope="module")
def census_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    prepare_census(CENSUS / "census-income.test.gz", CENSUS / "split_seed2026", cache)
    return cache


# ---------------------------------------------------------------------------------------------- census


def test_census_loader_on_the_real_file(census_cache):
    directory = prepare_census(CENSUS / "census-income.test.gz", CENSUS / "split_seed2026", census_cache)  # cache hit
    meta = load_meta(directory)
    assert meta.rows == {"train": 79_810, "val": 9_976, "test": 9_976}
    assert meta.extra_columns == ["income", "never_married"]
    expected = json.loads((CENSUS / "split_seed2026" / "split.json").read_text())["parts"]
    for split in ("train", "val", "test"):
        frame = pl.read_parquet(directory / f"{split}.parquet")
        assert frame.height == expected[split]["n"]
        assert int(frame["income"].sum()) == expected[split]["income_pos"]
        assert int(frame["never_married"].sum()) == expected[split]["marital_pos"]
        for leaked in ("instance_weight", "income_50k", "marital_stat"):
            assert leaked not in frame.columns
    schema = pl.read_parquet_schema(directory / "train.parquet")
    assert sum(dtype.is_integer() for c, dtype in schema.items() if c not in meta.extra_columns) == 32
    assert sum(dtype.is_float() for dtype in schema.values()) == 7
    train = pl.read_parquet(directory / "train.parquet")
    assert abs(float(train["age"].mean())) < 1e-3 and abs(float(train["age"].std(ddof=0)) - 1) < 1e-3
    assert int(train["education"].min()) >= 1  # every train value is in the vocabulary; 0 = unseen


def test_census_datamodule_batches_and_fields_backbone(census_cache):
    dm = census_module(census_cache, batch_size=64)
    inputs = dm.backbone_inputs()
    assert len(inputs["categorical"]) == 32 and inputs["dense"][0] == "age" and len(inputs["dense"]) == 7
    assert inputs["categorical"]["sex"] == 3  # 2 values + the unseen id 0
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.batch_size == 64 and batch.dense.shape == (64, 7)
    assert batch.sparse.keys() == list(inputs["categorical"]) and (batch.sparse.lengths() == 1).all()
    assert set(batch.labels) == {"income", "marital"}
    backbone = FieldsBackbone(**inputs, embedding_dim=4)
    assert backbone.output_dim == 32 * 4 + 7
    features = backbone(batch).features
    assert features.shape == (64, backbone.output_dim)
    torch.testing.assert_close(features[:, -7:], batch.dense)
    meta_backbone = FieldsBackbone(**inputs, embedding_dim=4, device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in meta_backbone.parameters())


def test_fields_model_trains_on_census_batches(census_cache):
    from mtl.mmoe import MMoETower

    dm = census_module(census_cache, batch_size=512)
    dm.setup()
    torch.manual_seed(0)
    model = build_ranking_model(
        dm,
        partial(FieldsBackbone, embedding_dim=4),
        partial(MMoETower, num_experts=2, expert_hidden=(16,), tower_hidden=(8,)),
        init_std=None,
    )
    first, last = fit_one_batch(model, dm.tasks, dm.tables["train"].batch(np.arange(2048)), steps=15)
    assert last < 0.7 * first
    module = RankingModule(model, dm.tasks, lambda p: torch.optim.Adam(p), lambda p: torch.optim.Adam(p))
    module._collect(dm.tables["val"].batch(np.arange(3000)))
    metrics = module.evaluation_metrics("val")
    assert metrics["val/income/auc"] > 0.65 and metrics["val/marital/auc"] > 0.9
    assert "val/income/gauc_user" not in metrics and "val/auc" in metrics


# ---------------------------------------------------------------------------------------------- task config errors


def test_unknown_label_column_names_the_task_and_the_columns(census_cache):
    dm = census_module(census_cache, tasks=[{"name": "income", "label": "income_50k"}])
    with pytest.raises(
        DataValidationError, match=r"task 'income' reads label column 'income_50k'.*\['income', 'never_married'\]"
    ):
        dm.prepare()


def test_wrong_loss_type_and_bad_task_entries():
    with pytest.raises(
        ValueError, match=r"task 'income': unknown loss 'bce'; choose one of \['binary', 'regression'\]"
    ):
        parse_tasks([{"name": "income", "label": "income", "loss": "bce"}])
    with pytest.raises(ValueError, match="unknown key"):
        parse_tasks([{"name": "income", "lable": "income"}])
    with pytest.raises(ValueError, match="duplicate task names"):
        parse_tasks([{"name": "a"}, {"name": "a"}])


def test_binary_task_on_a_non_binary_label_is_rejected(tmp_path):
    frame = pl.DataFrame({"f": ["a", "b", "a", "c"] * 5, "x": np.arange(20.0), "y": [0, 1, 2, 1] * 5})
    parts = {"train": np.arange(12), "val": np.arange(12, 16), "test": np.arange(16, 20)}
    splits = encode_tabular(frame, parts, ["f"], ["x"], {"rating": pl.col("y")}, "mem")
    assert splits["val"]["f"].to_list() == [1, 2, 1, 3]
    write_tabular(tmp_path, "tiny", "0" * 16, {}, splits, ["rating"])
    source = lambda cache_root: tmp_path / ("tiny-" + "0" * 16)  # noqa: E731
    dm = TabularDataModule("tiny", source, str(tmp_path), tasks=[{"name": "r", "label": "rating"}])
    with pytest.raises(DataValidationError, match=r"column 'rating' \(task 'r', loss binary\) must hold only 0 or 1"):
        dm.setup()
    dm = TabularDataModule(
        "tiny", source, str(tmp_path), tasks=[{"name": "r", "label": "rating", "loss": "regression"}]
    )
    dm.setup()
    assert len(dm.tables["train"]) == 12


# ---------------------------------------------------------------------------------------------- samples, ml100k


def test_tiny_sample_loaders(tmp_path):
    data = shared_data() / "mtl"
    ali = load_meta(prepare_ali_ccp(data / "ali_ccp_sample", tmp_path))
    assert ali.rows == {"train": 100, "val": 50, "test": 50} and ali.extra_columns == ["click", "purchase", "ctcvr"]
    train = pl.read_parquet(prepare_ali_ccp(data / "ali_ccp_sample", tmp_path) / "train.parquet")
    assert (int(train["click"].sum()), int(train["purchase"].sum()), int(train["ctcvr"].sum())) == (7, 1, 1)
    assert train.width == 23 + 8 + 3
    aliexpress = prepare_aliexpress(data / "aliexpress_sample", tmp_path)
    meta = load_meta(aliexpress)
    assert meta.rows == {"train": 90, "val": 10, "test": 20}
    frames = [pl.read_parquet(aliexpress / f"{s}.parquet") for s in ("train", "val")]
    assert sum(int(f["click"].sum()) for f in frames) == 60 and frames[0].width == 16 + 63 + 3
    byterec = prepare_byterec(data / "byterec_sample", tmp_path)
    assert load_meta(byterec).rows == {"train": 160, "val": 20, "test": 20}
    frames = [pl.read_parquet(byterec / f"{s}.parquet") for s in ("train", "val", "test")]
    assert sum(int(f["finish"].sum()) for f in frames) == 76 and sum(int(f["like"].sum()) for f in frames) == 7


def test_ml100k_like_label_in_the_entire_space(tmp_path):
    directory = prepare_ml100k(shared_data() / "ml-100k", tmp_path, like_threshold=4)
    meta = load_meta(directory)
    assert meta.extra_columns == ["rating", "like"] and meta.params["like_threshold"] == 4
    frame = pl.read_parquet(directory / "test.parquet")
    assert (frame["like"] == (frame["rating"] >= 4).cast(pl.Int8)).all()
    assert int(frame.filter(pl.col("label") == 0)["like"].sum()) == 0  # negatives are never liked
    assert 0 < int(frame["like"].sum()) < int(frame["label"].sum())


# ---------------------------------------------------------------------------------------------- composition


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("mtl", ["single", "shared_bottom", "mmoe", "ple", "esmm", "switch", "taskexpert"])
def test_every_mtl_option_composes_with_fields_and_census(mtl):
    cfg = _compose(["recsys=fields", f"mtl={mtl}"])
    assert cfg.data.name == "census" and cfg.model.init_std is None  # recsys=fields defaults
    tasks = parse_tasks(cfg.data.tasks)
    tower = instantiate(cfg.mtl)(in_dim=20, tasks=tasks)
    out = tower(torch.randn(4, 20))
    assert set(out.logits) == {"income", "marital"}


def test_ml100k_mtl_and_sample_configs_compose():
    cfg = _compose(["recsys=dare", "mtl=taskexpert", "data=ml100k_mtl"])
    assert [t.name for t in parse_tasks(cfg.data.tasks)] == ["click", "like"]
    assert cfg.data.source.like_threshold == 4 and cfg.data.name == "ml100k_mtl"
    backbone = instantiate(cfg.recsys)(vocab=Vocab(5, 30, 4), max_len=10)
    tower = instantiate(cfg.mtl)(in_dim=backbone.output_dim, tasks=parse_tasks(cfg.data.tasks))
    assert tower.task_names == ["click", "like"]
    for data in ("ali_ccp", "aliexpress", "byterec"):
        assert len(_compose(["recsys=fields", f"data={data}"]).data.tasks) == 2


def test_incompatible_pieces_give_clear_errors(census_cache):
    from mtl.single import SingleTower
    from recsys.models.target_attention import TargetAttentionBackbone

    dm = census_module(census_cache)
    with pytest.raises(
        ValueError, match=r"backbone TargetAttentionBackbone cannot be built.*recsys=fields needs tabular"
    ):
        build_ranking_model(dm, partial(TargetAttentionBackbone), partial(SingleTower))

    class CTRInputs:
        tasks = dm.tasks

        @staticmethod
        def backbone_inputs():
            return {"vocab": Vocab(5, 30, 4), "max_len": 10}

    with pytest.raises(ValueError, match=r"backbone FieldsBackbone cannot be built.*need CTR samples"):
        build_ranking_model(CTRInputs(), partial(FieldsBackbone), partial(SingleTower))
    from mtl.esmm import ESMMTower

    three = census_module(census_cache, tasks=CENSUS_TASKS + [{"name": "x", "label": "income"}])
    with pytest.raises(ValueError, match="mtl=esmm needs exactly two binary tasks"):
        build_ranking_model(three, partial(FieldsBackbone), partial(ESMMTower))
