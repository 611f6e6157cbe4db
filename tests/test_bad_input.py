"""Every row of docs/bad_input.md: the bad input, and the message it must produce (a substring)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from mtl.spec import TaskSpec, parse_tasks
from recsys.bundle import export_bundle, load_bundle
from recsys.data.ctr_table import CTRTable
from recsys.data.schema import DataValidationError
from recsys.data.vocab import Vocab
from recsys.errors import BundleError, CheckpointError, ConfigError
from recsys.tracking.mlflow import build_logger
from recsys.tracking.resume import check_checkpoint
from tests.conftest import REPO
from tests.helpers import random_samples

VOCAB = Vocab(20, 50, 6)
LABELS = {"click": "label"}


def _read(tmp_path: Path, frame: pl.DataFrame, labels=LABELS, binary=("label",)) -> CTRTable:
    path = tmp_path / "train.parquet"
    frame.write_parquet(path)
    return CTRTable.read_parquet(path, labels, VOCAB, binary)


def _first_row(column: str, value) -> pl.Expr:
    return pl.when(pl.int_range(pl.len()) == 0).then(value).otherwise(pl.col(column)).alias(column)


DATA_CASES = {
    "missing column": (lambda f: f.drop("hist_cat"), r"train\.parquet: missing column\(s\) \['hist_cat'\]"),
    "wrong dtype": (
        lambda f: f.with_columns(pl.col("item").cast(pl.String)),
        r"column 'item' has dtype String, expected an integer type",
    ),
    "wrong history dtype": (
        lambda f: f.with_columns(pl.col("hist_item").cast(pl.List(pl.Float64))),
        r"column 'hist_item' has dtype List\(Float64\), expected List\(Int64\)",
    ),
    "null id": (lambda f: f.with_columns(_first_row("item", None)), r"null values in column\(s\) \{'item': 1\}"),
    "empty history": (
        lambda f: f.with_columns(_first_row("hist_item", pl.lit([], dtype=pl.List(pl.Int64)))),
        r"column 'hist_item' has 1 empty histories",
    ),
    "history lengths differ (a negative length in offsets terms)": (
        lambda f: f.with_columns(
            _first_row("hist_cat", pl.lit([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], dtype=pl.List(pl.Int64)))
        ),
        r"columns 'hist_item' and 'hist_cat' differ in length on 1 rows",
    ),
    "id out of range": (
        lambda f: f.with_columns(_first_row("item", 999)),
        r"column 'item' has ids in \[\d+, 999\], outside the valid range \[1, 50\]",
    ),
    "negative id in a history": (
        lambda f: f.with_columns(_first_row("hist_cat", pl.col("hist_cat").list.eval(pl.element() * -1))),
        r"column 'hist_cat' has ids in \[-\d+, \d+\], outside the valid range \[0, 6\]",
    ),
    "label outside {0,1}": (
        lambda f: f.with_columns(_first_row("label", pl.lit(2, dtype=pl.Int8))),
        r"column 'label' must hold only 0 or 1; 1 rows do not",
    ),
    "no rows": (lambda f: f.clear(), r"the table has no rows"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_samples(case, tmp_path):
    corrupt, message = DATA_CASES[case]
    with pytest.raises(DataValidationError, match=message):
        _read(tmp_path, corrupt(random_samples(rows=32)))


def test_extra_columns_are_accepted(tmp_path):
    table = _read(tmp_path, random_samples(rows=32).with_columns(pl.lit("x").alias("comment")))
    assert len(table) == 32


def test_nan_label_of_a_regression_task(tmp_path):
    frame = random_samples(rows=32).with_columns(pl.Series("watch", [math.nan] + [1.0] * 31))
    with pytest.raises(DataValidationError, match=r"column 'watch' holds NaN or infinite labels"):
        _read(tmp_path, frame, labels={"click": "label", "watch": "watch"})


def test_missing_label_column(tmp_path):
    with pytest.raises(DataValidationError, match=r"missing label column 'like'"):
        _read(tmp_path, random_samples(rows=32), labels={"click": "label", "like": "like"})


def test_corrupt_or_truncated_parquet(tmp_path):
    good = tmp_path / "good.parquet"
    random_samples(rows=32).write_parquet(good)
    bad = tmp_path / "train.parquet"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataValidationError, match=r"train\.parquet: cannot read parquet"):
        CTRTable.read_parquet(bad, LABELS, VOCAB)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"name": "click", "loss": "hinge"},
            r"task 'click': unknown loss 'hinge'; choose one of \['binary', 'regression'\]",
        ),
        ({"name": "click", "labl": "x"}, r"unknown key\(s\) \['labl'\]"),
    ],
)
def test_bad_task_config(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_tasks([entry])


def _tiny_model(embedding_dim: int):
    from mtl.single import SingleTower
    from recsys.models.ranking import RankingModel
    from recsys.models.target_attention import TargetAttentionBackbone

    backbone = TargetAttentionBackbone(VOCAB, 12, embedding_dim=embedding_dim)
    return RankingModel(backbone, SingleTower(backbone.output_dim, [TaskSpec("click")]))


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _tiny_model(8).state_dict().items()}}, path)

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _tiny_model(16)

    with pytest.raises(CheckpointError, match=r"the checkpoint belongs to another model"):
        check_checkpoint(str(path), Task())


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": _tiny_model(8).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read the checkpoint \(truncated or corrupt\?\)"):
        check_checkpoint(str(path), _tiny_model(8))


def test_bundle_weights_of_another_model(tmp_path):
    import yaml

    source = tmp_path / "b"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text(
        '{"name": "x", "fingerprint": "f", "num_users": 20, "num_items": 50, '
        '"num_categories": 6, "max_len": 12, "rows": {}, "params": {}, "extra_columns": []}'
    )
    config = yaml.safe_load((REPO / "configs" / "recsys" / "twin.yaml").read_text())
    config = {
        "recsys": {**config, "embedding_dim": 16},
        "mtl": {"_target_": "mtl.single.SingleTower", "_partial_": True},
        "data": {"tasks": [{"name": "click", "label": "label"}]},
    }
    export_bundle(
        source,
        config,
        cache,
        _tiny_model(8),
        {"run_name": "x", "model_builder": "recsys.models.ranking.build_ranking_model"},
    )
    with pytest.raises(BundleError, match=r"weights\.pt does not match the model in its config\.yaml"):
        load_bundle(source)


def test_unwritable_tracking_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"MLflow tracking store folder .* cannot be created"):
        build_logger(f"sqlite:///{blocker}/sub/mlflow.db", str(tmp_path / "art"), "x")


@pytest.mark.parametrize(
    "override, message",
    [
        ("recsys=nope", "Could not find 'recsys/nope'"),
        ("recsys.nope=1", "Could not override 'recsys.nope'"),
        ("mtl=mmoe data=beauty recsys=sasrec", "a task tower (MMoETower) is not supported with the sequential model"),
    ],
)
@pytest.mark.e2e
@pytest.mark.slow
def test_bad_config_on_the_command_line(override, message, tmp_path):
    sequences = tmp_path / "tiny.txt"
    sequences.write_text(
        "".join(f"{u} " + " ".join(str(1 + (u + k) % 9) for k in range(6)) + "\n" for u in range(1, 30))
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            *override.split(),
            f"paths.root_dir={tmp_path}",
            f"data.path={sequences}" if "beauty" in override else "seed=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
