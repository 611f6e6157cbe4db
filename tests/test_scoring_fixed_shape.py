"""Fixed-shape scoring batches (``fixed_shape``): the numpy pad helper, equality with the KJT path (scores, rejects,
counts) on histories longer and shorter than the model's width and on unseen ids under both policies, the same for
the ids mapped on the device (``map_on_device``, forced on the CPU), the setting's checks, and ``file_workers``
over fixed-shape batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.score import run
from recsys.bundle import IdMapper, load_bundle
from recsys.data.ctr_table import padded_history
from recsys.errors import ConfigError
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.scoring.ctr_scorer import CTRScorer, ScoreStats
from tests.test_scoring import make_bundle, score_cfg

UNSEEN = 10**12  # a raw id no id map holds


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """Weights drawn wide enough (tables N(0, 0.5), dense N(0, 0.2); DARE's init is 0.01) that the rows' scores
    differ: an equality of scores then says the two paths computed the same function of the ids."""
    return make_bundle(tmp_path_factory, ("recsys.init_std=0.5", "model.init_std=0.2"))


@pytest.fixture(scope="module")
def max_len(bundle_dir) -> int:
    return load_bundle(bundle_dir / "model").meta.max_len


def test_padded_history_on_a_hand_example():
    padded = padded_history(
        np.array([7, 8, 9, 4, 5, 6]),
        np.array([1, 1, 2, 3, 3, 1]),
        np.array([3, 1, 2]),
        np.array([11, 12, 13]),
        np.array([2, 3, 1]),
        width=4,
    )
    assert padded.hist_item.dtype == torch.int32 and padded.hist_cat.dtype == torch.int32  # the ids fit
    assert padded.hist_item.tolist() == [[7, 8, 9, 0], [4, 0, 0, 0], [5, 6, 0, 0]]
    assert padded.hist_cat.tolist() == [[1, 1, 2, 0], [3, 0, 0, 0], [3, 1, 0, 0]]
    assert padded.lengths.tolist() == [3, 1, 2] and padded.lengths.dtype == torch.int64
    assert padded.target_item.tolist() == [11, 12, 13] and padded.target_cat.dtype == torch.int64
    full = padded_history(np.array([1, 2, 3, 2**40]), np.array([1, 2, 3, 4]), np.array([2, 2]), [5, 6], [1, 2], 2)
    assert full.hist_item.dtype == torch.int64 and full.hist_item.tolist() == [[1, 2], [3, 2**40]]  # too big
    assert full.hist_cat.dtype == torch.int32 and full.hist_cat.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="more than the padded width 1"):
        padded_history(np.array([1, 2]), np.array([1, 2]), np.array([2]), [5], [1], width=1)


def edge_logs(bundle_dir: Path, max_len: int, path: Path) -> pl.DataFrame:
    """The exported logs plus rows the fixed shape must pad or truncate: histories longer than the model's
    width (tripled), of one behaviour, unseen ids in the kept part of a history, in the part truncated away, in
    a target; and rows rejected whatever the policy (empty history, null id)."""
    frame = pl.concat([pl.read_parquet(p) for p in sorted((bundle_dir / "logs").glob("*.parquet"))])
    long = frame.head(12).with_columns(
        pl.concat_list("hist_item", "hist_item", "hist_item").alias("hist_item"),
        pl.concat_list("hist_cat", "hist_cat", "hist_cat").alias("hist_cat"),
    )
    assert long["hist_item"].list.len().max() > max_len, "the edge logs need histories longer than the width"
    one = frame.slice(12, 12).with_columns(pl.col("hist_item").list.tail(1), pl.col("hist_cat").list.tail(1))
    newest_unseen = frame.slice(24, 3).with_columns(
        pl.col("hist_item")
        .list.head(pl.col("hist_item").list.len() - 1)
        .list.concat(pl.lit([UNSEEN]))
        .alias("hist_item")
    )
    # the unseen id is the oldest of a history longer than the width: truncated away
    oldest_unseen = long.head(3).with_columns(
        pl.lit([UNSEEN]).list.concat(pl.col("hist_item")).alias("hist_item"),
        pl.col("hist_cat").list.head(1).list.concat(pl.col("hist_cat")).alias("hist_cat"),
    )
    target_unseen = frame.slice(27, 2).with_columns(pl.lit(UNSEEN).alias("category"))
    empty = frame.slice(29, 1).with_columns(pl.lit([], dtype=pl.List(pl.Int64)).alias("hist_item"))
    null = frame.slice(30, 1).with_columns(pl.lit(None, dtype=pl.Int64).alias("item"))
    parts = [long, one, newest_unseen, oldest_unseen, target_unseen, empty, null, frame.slice(31)]
    logs = pl.concat([p.with_columns(pl.col("hist_item").cast(pl.List(pl.Int64))) for p in parts])
    logs.write_parquet(path)
    return logs


@pytest.mark.parametrize("unseen", ["map", "reject"])
def test_fixed_shape_scores_and_rejects_equal_the_kjt_path(bundle_dir, max_len, tmp_path, unseen):
    inputs = tmp_path / "in" / "edge.parquet"
    inputs.parent.mkdir()
    logs = edge_logs(bundle_dir, max_len, inputs)
    outputs = {}
    for fixed in (True, False):
        out = tmp_path / f"fixed-{fixed}"
        stats = run(score_cfg(bundle_dir, out, inputs=inputs.parent, unseen=unseen, fixed_shape=fixed))
        summary = json.loads((out / "_summary.json").read_text())
        assert summary["last_run"]["fixed_shape"] is fixed
        outputs[fixed] = (pl.read_parquet(out / "edge.parquet"), pl.read_parquet(out / "_rejected" / "edge.parquet"))
        outputs[fixed, "stats"] = stats.to_dict()
    (fixed_scores, fixed_rejects), (kjt_scores, kjt_rejects) = outputs[True], outputs[False]
    assert outputs[True, "stats"] == outputs[False, "stats"]
    stats = outputs[True, "stats"]
    mapped = 3 + 2  # the newest behaviours and the targets; the id truncated away is neither mapped nor rejected
    assert stats["unseen_ids_mapped"] == (mapped if unseen == "map" else 0)
    assert stats["rows_rejected"] == (
        {"empty_history": 1, "null": 1} | ({"unseen_id": 5} if unseen == "reject" else {})
    )
    assert stats["rows_in"] == logs.height and fixed_scores.height == stats["rows_scored"]
    assert fixed_rejects.equals(kjt_rejects)
    # identical, bit for bit, on this model (in general the two may differ by float rounding: a KJT batch is as
    # wide as its longest history, and that width picks gathered_dot's branch)
    assert fixed_scores.equals(kjt_scores)
    assert fixed_scores["score_click"].std() > 0.01  # not near a constant: the ids matter


def test_prepare_builds_the_padded_ids_in_numpy(bundle_dir, max_len):
    bundle = load_bundle(bundle_dir / "model")
    frame = pl.read_parquet(sorted((bundle_dir / "logs").glob("*.parquet"))[0]).head(7)
    frame = frame.with_columns(pl.col("hist_item").list.head(2), pl.col("hist_cat").list.head(2))
    prepared = CTRScorer(bundle, fixed_shape=True).prepare(frame)
    padded = prepared.batch.padded
    assert prepared.batch.sparse is None and padded.hist_item.shape == (7, max_len)
    assert padded.hist_item.dtype == torch.int32 and padded.lengths.tolist() == [2] * 7
    assert bool((padded.hist_item[:, :2] > 0).all()) and not bool(padded.hist_item[:, 2:].any())
    assert CTRScorer(bundle).prepare(frame).batch.padded is None  # auto on CPU: the KJT


def test_fixed_shape_auto_follows_the_device_and_the_tables(bundle_dir, monkeypatch):
    scorer = CTRScorer(load_bundle(bundle_dir / "model"))
    assert scorer.fixed_shape is False  # auto, on CPU
    scorer.device = torch.device("cuda")  # resolution only: nothing runs
    assert scorer._fixed_shape("auto") is True and scorer._fixed_shape(False) is False
    monkeypatch.setattr(TargetAttentionBackbone, "local_tables", property(lambda self: False))  # as if sharded
    assert scorer._fixed_shape("auto") is False
    with pytest.raises(ConfigError, match="fixed_shape=true: this model's tables are not local"):
        scorer._fixed_shape(True)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fixed_shape", "maybe", "fixed_shape='maybe': choose auto, true or false"),
        ("fixed_shape", 1, "fixed_shape=1: choose auto, true or false"),
        ("file_workers", 0, "file_workers=0: must be an integer >= 1"),
        ("file_workers", 1.5, "file_workers=1.5: must be an integer >= 1"),
        ("file_workers", "two", "file_workers='two': must be an integer >= 1"),
    ],
)
def test_bad_settings_stop_with_one_line(bundle_dir, tmp_path, key, value, message):
    with pytest.raises(ConfigError) as err:
        run(score_cfg(bundle_dir, tmp_path / "out", **{key: value}))
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()  # checked before any file is touched


def test_two_file_workers_equal_one_on_fixed_shape_batches(bundle_dir, max_len, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    edge_logs(bundle_dir, max_len, inputs / "edge.parquet")
    for log in sorted((bundle_dir / "logs").glob("*.parquet")):
        (inputs / log.name).write_bytes(log.read_bytes())
    for workers in (1, 2):
        run(score_cfg(bundle_dir, tmp_path / f"w{workers}", inputs=inputs, fixed_shape=True, file_workers=workers))
    one = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*.parquet"))
    two = sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*.parquet"))
    assert one == two and len(one) == 5  # 4 score files + the edge file's rejects
    for name in one:
        assert pl.read_parquet(tmp_path / "w1" / name).equals(pl.read_parquet(tmp_path / "w2" / name)), name
    summary = json.loads((tmp_path / "w2" / "_summary.json").read_text())
    assert summary["last_run"]["file_workers"] == 2 and summary["files_done"] == 4


def score_in_batches(scorer: CTRScorer, logs: pl.DataFrame, rows: int) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """``logs`` through ``prepare`` / ``finish`` ``rows`` at a time -> (scores, rejects, counts), concatenated."""
    scored, rejected, stats = [], [], ScoreStats()
    for start in range(0, logs.height, rows):
        out, bad, batch_stats = scorer.finish(scorer.prepare(logs.slice(start, rows)))
        scored.append(out)
        rejected.append(bad)
        stats.add(batch_stats)
    return pl.concat(scored), pl.concat(rejected, how="vertical_relaxed"), stats.to_dict()


@pytest.mark.parametrize("unseen", ["map", "reject"])
def test_ids_mapped_on_the_device_equal_the_host_map_and_the_kjt(bundle_dir, max_len, tmp_path, unseen):
    bundle = load_bundle(bundle_dir / "model")
    logs = edge_logs(bundle_dir, max_len, tmp_path / "edge.parquet")
    scorers = {
        "device": CTRScorer(bundle, unseen=unseen, fixed_shape=True, map_on_device=True),
        "host": CTRScorer(bundle, unseen=unseen, fixed_shape=True),
        "kjt": CTRScorer(bundle, unseen=unseen, fixed_shape=False),
    }
    assert scorers["device"].map_on_device and not scorers["host"].map_on_device
    # the whole log in one batch; 3 rows at a time: rows 24-26 (the unseen newest behaviours) are one batch
    for rows in (logs.height, 3):
        results = {name: score_in_batches(scorer, logs, rows) for name, scorer in scorers.items()}
        scores, rejects, stats = results["device"]
        for other in ("host", "kjt"):
            assert stats == results[other][2], (rows, other)
            assert rejects.equals(results[other][1]), (rows, other)
            assert scores.drop("score_click").equals(results[other][0].drop("score_click")), (rows, other)
            np.testing.assert_allclose(scores["score_click"], results[other][0]["score_click"], rtol=0, atol=1e-6)
        assert stats["unseen_ids_mapped"] == (5 if unseen == "map" else 0)  # padding slots never count
        assert stats["rows_rejected"].get("unseen_id", 0) == (5 if unseen == "reject" else 0)
        assert stats["rows_scored"] == scores.height == logs.height - 2 - (5 if unseen == "reject" else 0)


def test_device_map_pads_after_mapping(bundle_dir, max_len):
    """The padding slots reach the model as row 0 whatever raw id 0 maps to; unseen ids count per real slot."""
    bundle = load_bundle(bundle_dir / "model")
    scorer = CTRScorer(bundle, fixed_shape=True, map_on_device=True)
    frame = pl.read_parquet(sorted((bundle_dir / "logs").glob("*.parquet"))[0]).head(3)
    frame = frame.with_columns(pl.col("hist_item").list.tail(2), pl.col("hist_cat").list.tail(2))
    frame = frame.with_columns(pl.Series("hist_cat", [[UNSEEN, UNSEEN], [0, 0], None])).head(2)
    raw = scorer.prepare(frame).batch.padded
    assert raw.hist_cat[:, :2].tolist() == [[UNSEEN, UNSEEN], [0, 0]]  # the raw ids, padded with raw 0
    padded, rows, count = scorer._map_padded(raw)
    assert padded.hist_cat[:, 2:].eq(0).all() and padded.hist_item[:, 2:].eq(0).all()
    assert padded.hist_cat[0, :2].tolist() == [0, 0] and padded.hist_item.dtype == torch.int64
    zero_unseen = int(bundle.mappers["category"](np.array([0]))[0]) < 0
    assert rows.tolist() == [True, zero_unseen] and int(count) == 2 + 2 * zero_unseen
    scorer._device_maps["category"] = IdMapper(np.arange(10), np.arange(1, 11), 10).to_torch()  # raw 0 -> row 1
    padded, rows, count = scorer._map_padded(raw)
    assert padded.hist_cat[:, :2].tolist() == [[0, 0], [1, 1]] and not padded.hist_cat[:, 2:].any()
    assert rows.tolist() == [True, False] and int(count) == 2
    with pytest.raises(ConfigError, match="map_on_device=true needs fixed-shape batches"):
        CTRScorer(bundle, fixed_shape=False, map_on_device=True)


@pytest.mark.gpu
@pytest.mark.parametrize("unseen", ["map", "reject"])
def test_ids_mapped_on_cuda_equal_the_cpu_host_map(bundle_dir, max_len, tmp_path, unseen):
    bundle = load_bundle(bundle_dir / "model")
    logs = edge_logs(bundle_dir, max_len, tmp_path / "edge.parquet")
    cuda = CTRScorer(bundle, unseen=unseen, device="cuda")
    assert cuda.fixed_shape and cuda.map_on_device
    cuda_scores, cuda_rejects, cuda_stats = score_in_batches(cuda, logs, 16)
    cpu = CTRScorer(load_bundle(bundle_dir / "model"), unseen=unseen)  # ids mapped on the host
    cpu_scores, cpu_rejects, cpu_stats = score_in_batches(cpu, logs, 16)
    assert cuda_stats == cpu_stats and cuda_rejects.equals(cpu_rejects)
    assert cuda_scores.drop("score_click").equals(cpu_scores.drop("score_click"))
    np.testing.assert_allclose(cuda_scores["score_click"], cpu_scores["score_click"], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_fixed_shape_on_cuda_equals_the_cpu_job(bundle_dir, tmp_path):
    run(score_cfg(bundle_dir, tmp_path / "cpu"))
    run(score_cfg(bundle_dir, tmp_path / "cuda", device="cuda", file_workers=2))
    last = json.loads((tmp_path / "cuda" / "_summary.json").read_text())["last_run"]
    assert last["fixed_shape"] is True and last["pinned_peak_mb"] > 0  # batches are pinned before their copy
    for path in sorted((tmp_path / "cpu").glob("part-*.parquet")):
        cpu, cuda = pl.read_parquet(path), pl.read_parquet(tmp_path / "cuda" / path.name)
        assert cpu.drop("score_click").equals(cuda.drop("score_click"))
        np.testing.assert_allclose(cuda["score_click"], cpu["score_click"], rtol=0, atol=1e-5)
