"""Bad raw data, one class per test: ids outside int64, sparse huge ids (remapped, outputs in raw ids), nulls
inside histories, cut or short Taobao CSV rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.data.seqrec_format import read_sequences
from recsys.errors import DataValidationError
from tests.conftest import REPO
from tests.test_scoring import _one_log, score_cfg
from tests.test_scoring import bundle_dir as bundle_dir  # a module fixture, reused


def test_seqrec_id_beyond_int64_names_file_line_value_and_range(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(f"1 2 3 4\n2 5 {2**63} 6\n")
    with pytest.raises(DataValidationError) as err:
        read_sequences(path)
    assert str(err.value) == (
        f"{path}: line 2 holds id {2**63}, outside the allowed range [1, {2**63 - 1}] (64-bit integer ids)."
    )


def test_sparse_huge_item_ids_are_remapped_and_scored_back_in_raw_ids(tmp_path):
    """Item ids around 10^15: the item table has one row per distinct item (not 10^15 rows); the id map
    keeps the raw ids, and scoring takes and returns raw ids."""
    from pipelines.score import run as score
    from recsys.bundle import export_bundle

    rng = np.random.default_rng(0)
    catalogue = 10**15 + 7919 * np.arange(1, 31)  # 30 items, sparse and huge
    lines = [[u, *rng.choice(catalogue, size=6, replace=False).tolist()] for u in range(1, 41)]
    data = tmp_path / "huge.txt"
    data.write_text("".join(" ".join(map(str, line)) + "\n" for line in lines))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["recsys=sasrec", f"data.path={data}", f"paths.root_dir={tmp_path}"])
    cfg.paths.output_dir = str(tmp_path / "run")
    datamodule = instantiate(cfg.data)
    meta = datamodule.prepare()
    assert meta.num_items == 30  # table rows: one per item
    id_map = pl.read_parquet(datamodule.dataset_dir / "id_map_item.parquet")
    assert id_map["raw"].to_list() == catalogue.tolist() and id_map["id"].to_list() == list(range(1, 31))
    test = pl.read_parquet(datamodule.dataset_dir / "test.parquet").sort("user")
    raw_of = dict(zip(id_map["id"].to_list(), id_map["raw"].to_list()))
    assert [raw_of[t] for t in test["targets"].list.first().to_list()] == [line[-1] for line in lines]

    from recsys.models.sequential import build_sequential_model

    torch.manual_seed(0)
    model = build_sequential_model(datamodule, instantiate(cfg.recsys))
    identity = {"run_name": "huge", "run_id": "r", "model_builder": "recsys.models.sequential.build_sequential_model"}
    export_bundle(
        tmp_path / "model", OmegaConf.to_container(cfg, resolve=True), datamodule.dataset_dir, model, identity
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    history = [int(catalogue[3]), int(catalogue[17])]
    histories = [history, [history[0], None]]  # the second: a null id inside the list
    schema = {"user": pl.Int64, "history": pl.List(pl.Int64)}
    pl.DataFrame({"user": [1, 2], "history": histories}, schema=schema).write_parquet(logs / "part.parquet")
    cfg_score = {"input": str(logs), "model": str(tmp_path / "model"), "output": str(tmp_path / "out"), "batch_size": 8}
    extra = {
        "unseen": "map",
        "keep_columns": ["user"],
        "top_n": 5,
        "threads": 1,
        "read_ahead": False,
        "progress": False,
    }
    stats = score(OmegaConf.create({**cfg_score, **extra}))
    assert stats.unseen_ids_mapped == 0  # the raw ids were found in the map
    assert dict(stats.rows_rejected) == {"null": 1}  # a null inside a history is rejected, not counted as unseen
    (items,) = pl.read_parquet(tmp_path / "out" / "part.parquet")["top_items"].to_list()
    assert len(items) == 5 and set(items) <= set(catalogue.tolist()) and not set(items) & set(history)


def test_null_inside_a_history_is_rejected_not_unseen(tmp_path):
    from recsys.data.schema import validate_samples
    from tests.helpers import random_samples

    frame = random_samples(rows=16).with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.col("hist_cat").list.eval(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.element())))
        .otherwise(pl.col("hist_cat"))
        .alias("hist_cat")
    )
    with pytest.raises(DataValidationError) as err:
        validate_samples(frame, "train.parquet")
    assert str(err.value) == (
        "train.parquet: column 'hist_cat' holds null ids inside 1 histories (first at row 3); null ids are not allowed."
    )


def test_ctr_scoring_rejects_a_null_inside_a_history(bundle_dir, tmp_path):
    from pipelines.score import run as score

    frame = (
        _one_log(bundle_dir)
        .head(6)
        .with_columns(
            pl.when(pl.int_range(pl.len()) == 2)
            .then(
                pl.col("hist_item").list.eval(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.element()))
            )
            .otherwise(pl.col("hist_item"))
            .alias("hist_item")
        )
    )
    frame.write_parquet(tmp_path / "in.parquet")
    stats = score(score_cfg(bundle_dir, tmp_path / "out", inputs=tmp_path / "in.parquet"))
    assert dict(stats.rows_rejected) == {"null": 1} and stats.unseen_ids_mapped == 0 and stats.rows_scored == 5


GOOD = "1,2,3,pv,1511539300\n2,2,3,cart,1511539400\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "1,5,3\n", r"t\.csv: line\(s\) \[3\] have missing fields; every line needs user,item,category,"),
        (
            GOOD + "2,2,3,click,1511539400\n",
            r"line\(s\) \[3\] have behavior_type 'click'; allowed: \['pv', 'buy', 'cart', 'fav'\]\.$",
        ),
        (
            GOOD + "2,2,3,pv,15115",
            r"line 3 has timestamp 15115, outside \[1511539200, 1512316799\] \(line 3, the last, ",
        ),
        (GOOD + "2,2", r"line\(s\) \[3\] have missing fields; .* the file looks cut off\)\.$"),
    ],
)
def test_taobao_short_or_cut_rows_name_file_and_line(tmp_path, text, message):
    from recsys.data.taobao import read_taobao_log

    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataValidationError, match=message):
        read_taobao_log(tmp_path / "t.csv")


def test_taobao_rows_outside_the_window_are_a_counted_drop(tmp_path, caplog):
    from recsys.data.taobao import read_taobao_log

    (tmp_path / "t.csv").write_text(GOOD + "2,2,3,pv,1505117799\n")
    with caplog.at_level("INFO", logger="recsys.data.taobao"):
        assert read_taobao_log(tmp_path / "t.csv").height == 2
    assert "left out 1 rows outside the time window" in caplog.text
