"""Sequential models end to end: `python -m pipelines.train recsys=sasrec` into MLflow, the builder's tower
check, and the benchmark that runs the real command."""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mtl.base import Tower
from recsys.models.sasrec import SASRec
from recsys.training.sequential import build_sequential_module
from tests.conftest import REPO


def run_train(tmp_path, *overrides):
    """``python -m pipelines.train`` into a tmp sqlite MLflow store (as tests/test_train_e2e.py does)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pipelines.train",
        f"paths.root_dir={tmp_path}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def tiny_sequences(path, users=60, items=40, seed=0):
    """S3-Rec lines with a learnable pattern: each user walks the items with a fixed stride."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        start, n = rng.integers(1, items), rng.integers(4, 12)
        lines.append(" ".join(map(str, [user] + [(start + 3 * k) % items + 1 for k in range(n)])))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.e2e
@pytest.mark.slow
def test_train_sasrec_logs_a_full_ranking_run(tmp_path):
    data = tiny_sequences(tmp_path / "tiny.txt")
    proc = run_train(
        tmp_path,
        "recsys=sasrec",
        "data=beauty",
        f"data.path={data}",
        "trainer.max_epochs=2",
        "callbacks.early_stopping.patience=1",
        "data.test_each_epoch=true",
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("beauty").experiment_id])[0]
    assert run.info.run_name.startswith("sasrec-beauty-") and run.info.status == "FINISHED"
    assert run.data.params["checkpoint.monitor"] == "val/ndcg@20"
    assert run.data.params["eval.exclude_history"] == "True"  # the protocol, an MLflow param
    metrics = run.data.metrics
    # MLflow forbids '@' in metric names: val/ndcg@20 is stored as val/ndcg20
    for key in ("test/ndcg10", "test/hr10", "test/ndcg20", "val/ndcg20", "train/rec", "train/loss_epoch"):
        assert key in metrics, key
    assert metrics["test/hr20"] > 0.3, metrics
    # data.test_each_epoch: the test split ranked after each of the 2 epochs, apart from validation
    assert (
        len(client.get_metric_history(run.info.run_id, "epoch_test/ndcg10")) == 2
    )  # a stride pattern is learnable even in 2 tiny epochs
    assert "'test/ndcg@10'" in proc.stdout + proc.stderr  # Lightning-side names keep the '@'
    assert "checkpoints/best.ckpt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    check_top_n_scoring(tmp_path, next(tmp_path.rglob("bundle.json")).parent)


def check_top_n_scoring(tmp_path, bundle_dir):
    """The run's bundle through pipelines.score: top-N items per user = the model's own ranking, history
    excluded; empty or all-unseen histories rejected, unseen ids counted."""
    import polars as pl
    from omegaconf import OmegaConf

    from pipelines.score import run as score
    from recsys.bundle import load_bundle
    from recsys.models.sequential import last_position_scores
    from recsys.scoring.seq_scorer import SeqScorer

    logs = tmp_path / "seq_logs"
    logs.mkdir()
    long = [1 + k % 10 for k in range(60)]  # longer than max_len (50): the newest 50 are the input
    histories = [[1, 4, 7], [10, 99999, 13], [], [99999], long]
    pl.DataFrame(
        {"user": [1, 2, 3, 4, 5], "history": histories}, schema={"user": pl.Int64, "history": pl.List(pl.Int64)}
    ).write_parquet(logs / "part-0.parquet")
    cfg = OmegaConf.create(
        {
            "input": str(logs),
            "model": str(bundle_dir),
            "output": str(tmp_path / "seq_scores"),
            "batch_size": 3,
            "unseen": "map",
            "keep_columns": ["user"],
            "top_n": 5,
            "threads": 1,
            "read_ahead": True,
            "progress": False,
        }
    )
    stats = score(cfg)
    out = pl.read_parquet(tmp_path / "seq_scores" / "part-0.parquet")
    assert out["user"].to_list() == [1, 2, 5]
    assert dict(stats.rows_rejected) == {"empty_history": 2} and stats.unseen_ids_mapped == 2
    model = load_bundle(bundle_dir).model
    for hist, items, scores in zip(
        ([1, 4, 7], [10, 13], long), out["top_items"].to_list(), out["top_scores"].to_list()
    ):
        assert len(items) == 5 and not set(items) & set(hist)
        assert scores == sorted(scores, reverse=True)
        batch = SeqScorer._batch(
            np.array(hist[-50:]), np.array([len(hist[-50:])]), exclude=(np.array(hist), np.array([len(hist)]))
        )
        assert items == (last_position_scores(model, batch).topk(5).indices[0] + 1).tolist()


def test_builder_rejects_task_towers():
    class FakeData:
        transition_graph = None

    with pytest.raises(ValueError, match=r"a task tower \(Tower\) is not supported with the sequential model SASRec"):
        build_sequential_module(FakeData(), functools.partial(SASRec), functools.partial(Tower), 0.01)


FAKE_RECBOLE = """import argparse, json, sys
p = argparse.ArgumentParser()
for a in ("--data", "--dataset", "--seed", "--max-epochs", "--time-budget-s", "--patience", "--batch-size", "--out",
          "--threads"):
    p.add_argument(a)
p.add_argument("--quiet", action="store_true")
p.add_argument("--cpu", action="store_true")
a = p.parse_args()
m = lambda v: {"HR@5": v, "HR@10": v, "HR@20": v, "NDCG@5": v, "NDCG@10": v, "NDCG@20": v}
open(a.out, "w").write(json.dumps({"dataset": a.dataset, "epochs_run": 3, "best_epoch": 2,
    "stopped_by": "time_budget", "sec_per_epoch_median": 2.0, "sec_per_epoch_all": [2.0, 2.5, 3.0],
    "data_prep_seconds": 1.0, "total_wall_seconds": 9.0, "valid_ndcg10_per_epoch": [0.1, 0.2, 0.15],
    "test": m(0.2), "test_history_removed": m(0.3), "hparams": {"batch_size": int(a.batch_size)},
    "env": {"argv": sys.argv[1:]}}))
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_benchmark_runs_ours_once_for_both_protocols_beside_recbole(tmp_path):
    """benchmarks.seqrec: RecBole's runner (a stand-in script here) gives two protocol rows from one run; ours runs
    pipelines.train once with both protocols, each row selected by its own validation NDCG@20; per-epoch val/test
    NDCG and epoch times come from MLflow; seconds_to_recbole_best uses RecBole's row of the same protocol."""
    from benchmarks import seqrec

    data = tiny_sequences(tmp_path / "tiny.txt")
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "recbole_masked.py").write_text(FAKE_RECBOLE)
    out, table = tmp_path / "seqrec.jsonl", tmp_path / "seqrec.md"
    args = [
        "--datasets", str(data), "--models", "recbole_sasrec", "sasrec", "--seeds", "0", "--max-epochs", "2",
        "--work", str(tmp_path / "work"), "--out", str(out), "--table", str(table), "--recbole-dir", str(peers),
        "--recbole-pythonpath", str(tmp_path), "--deadline-s", "3000", "trainer.enable_model_summary=false",
    ]  # fmt: skip
    rows = seqrec.main(args)
    assert [(r["implementation"], r["protocol"]) for r in rows] == [
        ("recbole", "history_kept"),
        ("recbole", "history_removed"),
        ("ours", "history_removed"),
        ("ours", "history_kept"),
    ]
    kept, removed = rows[0], rows[1]
    assert kept["ndcg10"] == 0.2 and removed["ndcg10"] == 0.3 and kept["seconds_to_recbole_best"] == 4.5
    assert kept["selection"] == "valid ndcg@10 (history_kept), patience 5" and kept["model"] == "sasrec"
    assert kept["stand_ins"] is not None and "--time-budget-s" in kept["command"]
    ours = rows[2:]
    for row, protocol in zip(ours, ("history_removed", "history_kept")):
        assert row["entry"] == "pipelines.train" and row["dataset"] == "tiny" and row["device"] == "cpu"
        assert len(row["epoch_times"]) == len(row["val_ndcg20"]) == len(row["test_ndcg10"]) == 2
        # training alone: each epoch's time without its validation and test ranking, shorter but not zero
        assert all(0 < t < e for t, e in zip(row["train_times"], row["epoch_times"]))
        if row["seconds_to_recbole_best"] is not None:
            assert 0 < row["train_seconds_to_recbole_best"] < row["seconds_to_recbole_best"]
        assert row["best_epoch"] == 1 + row["val_ndcg20"].index(max(row["val_ndcg20"]))
        assert row["selection"] == f"val ndcg@20 ({protocol}), patience 20"
        assert row["protocols_in_run"] == ["history_removed", "history_kept"]
        assert row["stopped_by"] == "max_epochs" and row["converged"]
        assert row["recbole_reference"]["source"] == "measured"
        assert row["ndcg10"] == row["test_ndcg10"][row["best_epoch"] - 1]  # the selected epoch's test ranking
    assert ours[0]["test_from"] == "checkpoint" and ours[1]["test_from"] == "epoch_test"
    assert "eval.both_protocols=true" in ours[0]["command"] and "EarlyStoppingAll" in ours[0]["command"]
    assert seqrec.seconds_to_reach([0.1, 0.3, 0.5], [2.0, 3.0, 4.0], 0.25) == 5.0
    assert seqrec.seconds_to_reach([0.1], [2.0], 0.25) is None
    text = table.read_text()
    assert "| tiny | history_kept | RecBole | sasrec |" in text and "| tiny | history_kept | ours | sasrec |" in text
    assert row["overrides"] == ["trainer.enable_model_summary=false"]  # the extra Hydra overrides, named in the table
    rule = "val ndcg@20, patience 20; trainer.enable_model_summary=false"
    side = f"| tiny | ours | sasrec | cpu | pipelines.train | {rule} | 1 |"
    assert side in text
    seqrec.main(["--table-only", "--out", str(out), "--table", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == text


def test_benchmark_table_puts_protocols_side_by_side_and_keeps_notes(tmp_path):
    from benchmarks import seqrec

    def row(impl, protocol, ndcg10):
        rule = "val ndcg@20 ({}), patience 20" if impl == "ours" else "valid ndcg@10 (history_kept), patience 5"
        selection = rule.format(protocol)
        return {"implementation": impl, "model": "sasrec", "dataset": "yelp", "device": "cuda", "seed": 0,
                "entry": "e", "protocol": protocol, "selection": selection, "best_epoch": 3, "sec_per_epoch": 1.0,
                **dict.fromkeys(seqrec.METRICS, 0.0), "ndcg10": ndcg10}  # fmt: skip

    rows = [row("ours", "history_removed", 0.02), row("ours", "history_kept", 0.03)]
    rows += [row("recbole", "history_kept", 0.04), row("recbole", "history_removed", 0.05)]
    table = tmp_path / "seqrec.md"
    table.write_text("# old\n\n| a |\n\n## Notes on these runs\n\n- hand-written\n")
    seqrec.write_table(rows, table)
    seqrec.write_table(rows, table)
    text = table.read_text()
    assert text.count("## Notes on these runs\n\n- hand-written\n") == 1 and "# old" not in text
    side = text.split("## Side by side")[1].split("## Every metric")[0]
    assert "| yelp | ours | sasrec | cuda | e | val ndcg@20, patience 20 | 1 | 0.0200 | 0.0300 |" in side
    recbole = "| yelp | RecBole | sasrec | cuda | e | valid ndcg@10 (history_kept), patience 5 | 1 | 0.0500 | 0.0400 |"
    assert recbole in side  # removed before kept: RecBole's re-ranked checkpoint, then its own protocol
    # a run with other settings (a schedule) is its own row, its overrides named beside the rule
    rows.append({**row("ours", "history_kept", 0.07), "overrides": ["data.batch_size=1024"]})
    seqrec.write_table(rows, table)
    side = table.read_text().split("## Side by side")[1].split("## Every metric")[0]
    assert "| val ndcg@20, patience 20; data.batch_size=1024 | 1 | – | 0.0700 |" in side
    assert "| yelp | ours | sasrec | cuda | e | val ndcg@20, patience 20 | 1 | 0.0200 | 0.0300 |" in side
    # the best trial of a search is its own row too, the trial budget named (not averaged with the config's runs)
    rows.append({**row("ours", "history_removed", 0.09), "tuned": True, "trials": 7})
    seqrec.write_table(rows, table)
    side = table.read_text().split("## Side by side")[1].split("## Every metric")[0]
    assert "| val ndcg@20, patience 20; tuned, best of 7 trials | 1 | 0.0900 | – |" in side
    assert "| yelp | ours | sasrec | cuda | e | val ndcg@20, patience 20 | 1 | 0.0200 | 0.0300 |" in side
