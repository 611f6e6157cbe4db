"""DARE analysis helpers (benchmarks/dare_analysis.py, benchmarks/common.py) on hand examples, and the synthetic
generator's planted (category, position) option."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.common import paired_interval
from benchmarks.dare_analysis import (
    binary_mi,
    ground_truth_relevance,
    mi_scores,
    ndcg_at_k,
    relative_positions,
    summary,
)
from recsys.data.synthetic import generate_log
from recsys.errors import ConfigError
from tests.helpers import TINY_SYNTHETIC as TINY
from tests.helpers import run_benchmark as _benchmark


def _mi_from_joint(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook MI (nats) of two 0/1 arrays from their empirical joint distribution."""
    total = 0.0
    for a in (0, 1):
        for b in (0, 1):
            pxy = np.mean((x == a) & (y == b))
            if pxy > 0:
                total += pxy * math.log(pxy / (np.mean(x == a) * np.mean(y == b)))
    return total


def test_binary_mi_known_values():
    assert binary_mi(2, 2, 2, 4) == pytest.approx(math.log(2))  # X == Y, fair coin: H(Y) = ln 2
    assert binary_mi(1, 2, 2, 4) == pytest.approx(0.0)  # independent
    assert binary_mi(0, 2, 2, 4) == pytest.approx(math.log(2))  # X == 1 - Y: as informative
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    y[:30] = x[:30]
    counts = ((x & y).sum(), x.sum(), y.sum(), 50)
    assert binary_mi(*counts) == pytest.approx(_mi_from_joint(x, y))


def test_relative_positions_latest_is_one():
    pos, mask = relative_positions(np.array([3, 1]), 4)
    assert pos.tolist() == [[3, 2, 1, 0], [1, 0, 0, 0]]
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_mi_scores_hand_example():
    # 4 clicks, categories 1..2; the latest behaviour (relative position 1) always has the target's category,
    # the older one (position 2) is independent of it.
    target = np.array([1, 1, 2, 2])
    hist = np.array([[2, 1], [1, 1], [2, 2], [1, 2]])  # oldest first
    scores = mi_scores(target, hist, np.array([2, 2, 2, 2]), num_categories=2)
    assert scores.shape == (3, 3, 3)
    assert scores[1, 1, 1] == pytest.approx(math.log(2))
    assert scores[2, 1, 2] == pytest.approx(math.log(2))
    assert scores[1, 2, 1] == pytest.approx(0.0)
    assert scores[2, 2, 1] == pytest.approx(0.0)
    # ground truth of the first row with top=1: only its latest behaviour (slot 1)
    rel = ground_truth_relevance(scores, target, hist, np.array([2, 2, 2, 2]), top=1)
    assert rel[0].tolist() == pytest.approx([0.0, math.log(2)])


def test_ground_truth_ignores_padding():
    scores = np.ones((2, 4, 2))
    rel = ground_truth_relevance(scores, np.array([1]), np.array([[1, 1, 0]]), np.array([2]), top=3)
    assert rel.tolist() == [[1.0, 1.0, 0.0]]


def test_ndcg_hand_example():
    relevance = np.array([[3.0, 2.0, 0.0, 1.0], [3.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    retrieved = np.array([[0, 1], [3, 2], [0, 1]])
    ndcg = ndcg_at_k(retrieved, relevance)
    ideal = 3 + 2 / math.log2(3)
    assert ndcg[0] == pytest.approx(1.0)
    assert ndcg[1] == pytest.approx(1.0 / ideal)
    assert math.isnan(ndcg[2])  # nothing relevant: undefined, left out of the mean


def test_paired_interval_hand_example():
    mean, low, high = paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd 1 / sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert paired_interval([0.5], [0.25])[1:] == (float("-inf"), float("inf"))
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 2.0])


def test_summary_means_over_seeds_and_pairs_dare_with_twin_by_seed():
    def row(model, seed, value, analysis="retrieval_ndcg", **extra):
        return {"dataset": "d", "dim": 16, "model": model, "seed": seed, "value": value, "analysis": analysis, **extra}

    rows = [
        row("twin", 1, 0.5), row("twin", 2, 0.7), row("dare", 1, 0.6), row("dare", 2, 0.9), row("dare", 3, 0.1),
        row("din", 1, None, "iters_to_acc"), row("din", 2, 40, "iters_to_acc"),
        row("twin", 1, 0.80, "att_dim_ratio", ratio=0.5), row("dare", 1, 0.83, "att_dim_ratio", ratio=0.5),
    ]  # fmt: skip
    lines = {line.split(" | ")[2]: line for line in summary(rows).splitlines() if line.startswith("| d |")}
    # seed 3 has no TWIN row: the pairs are seeds 1 and 2 (+0.1, +0.2)
    mean, low, high = paired_interval([0.6, 0.9], [0.5, 0.7])
    assert "0.6000 ± 0.1414 (2/2)" in lines["retrieval_ndcg"] and "(3/3)" in lines["retrieval_ndcg"]
    assert f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (n = 2)" in lines["retrieval_ndcg"]
    assert "| 40 (1/2) |" in lines["iters_to_acc"]  # one seed never reached the target
    assert "+0.0300 [-inf, +inf] (n = 1)" in lines["att_dim_ratio 0.5"]


def test_synthetic_echo_default_off_and_planted_when_on():
    base = generate_log(num_users=40, min_len=30, max_len=40, seed=1)
    assert base.equals(generate_log(num_users=40, min_len=30, max_len=40, seed=1, echo_lags=[], echo_prob=0.0))

    def lag_match(frame, lag):
        cat, user = frame["category"].to_numpy(), frame["user"].to_numpy()
        same_user = user[lag:] == user[:-lag]
        return np.mean(cat[lag:][same_user] == cat[:-lag][same_user])

    echoed = generate_log(num_users=40, min_len=30, max_len=40, seed=1, echo_lags=[4], echo_prob=0.6)
    assert lag_match(echoed, 4) > lag_match(base, 4) + 0.3
    with pytest.raises(ConfigError, match="echo_lags"):
        generate_log(num_users=5, min_len=30, max_len=40, echo_prob=0.5)


def test_mi_ground_truth_finds_the_planted_lag():
    """On the generator's echo option, the MI ranks (target category, the echo lag) above every other relative
    position of the target category."""
    lag, width = 3, 12
    log = generate_log(num_users=600, min_len=width + 1, max_len=width + 1, seed=2, echo_lags=[lag], echo_prob=0.7)
    cat = log["category"].to_numpy().reshape(600, width + 1)  # one user per row, oldest first; last = target
    scores = mi_scores(cat[:, -1], cat[:, :-1], np.full(600, width), num_categories=int(cat.max()))
    per_position = np.array([[scores[t, p, t] for p in range(1, width + 1)] for t in np.unique(cat[:, -1])])
    assert (per_position.mean(axis=0).argmax() + 1) == lag


def test_best_epoch_is_the_first_maximum():
    from benchmarks.dare_ml100k import best_epoch

    assert best_epoch([0.6, 0.7, 0.7, 0.65]) == 2
    assert best_epoch([]) == 0


@pytest.mark.slow
@pytest.mark.e2e
def test_dare_analysis_writes_every_analysis(tmp_path):
    rows = _benchmark(
        tmp_path, "benchmarks.dare_analysis", "--models", "twin", "dare", "--dim", "8", "--ratios", "0.5",
        "--target-auc", "0.5", "--tag", "a", *TINY,
    )  # fmt: skip
    kinds = {(r["model"], r["analysis"]) for r in rows}
    assert kinds == {(m, a) for m in ("twin", "dare") for a in ("retrieval_ndcg", "iters_to_acc", "att_dim_ratio")}
    ndcg = [r["value"] for r in rows if r["analysis"] == "retrieval_ndcg"]
    assert all(0.0 <= v <= 1.0 for v in ndcg)
    assert len([r for r in rows if r["analysis"] == "att_dim_ratio"]) == 4  # ratio 1 and 0.5 per model
    over_seeds, every = (tmp_path / "results" / "a.md").read_text().split("### Every result")
    assert every.count("| retrieval_ndcg |") == 2  # one row per model
    assert over_seeds.count("| retrieval_ndcg |") == 1 and "(n = 1)" in over_seeds  # the summary, DARE - TWIN paired
    plots = tmp_path / "logs" / "benchmarks" / "a" / "plots"
    assert {p.name for p in plots.iterdir()} == {"retrieval_ndcg.png", "iters_to_acc.png", "att_dim_ratio.png"}
    from mlflow.tracking import MlflowClient  # the MLflow run holds each analysis's plot and table

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'benchmarks' / 'a' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dare_analysis").experiment_id])
    analyses = ("retrieval_ndcg", "iters_to_acc", "att_dim_ratio")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {f"plots/{a}.png" for a in analyses}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "tables")} == {f"tables/{a}.md" for a in analyses}


def test_overrides_after_a_list_option_are_not_taken_as_its_values():
    """``--ratios 0.5 0.25 trainer=cpu`` (the overrides right after a list option) once failed with "invalid float
    value: 'trainer=cpu'"; an explicit ``--`` keeps working, and options with ``=`` stay options."""
    import argparse

    from benchmarks.common import parse_with_overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", nargs="*", type=float, default=[])
    parser.add_argument("--label")
    parser.add_argument("overrides", nargs="*")
    args = parse_with_overrides(parser, ["--ratios", "0.5", "0.25", "trainer=cpu", "data.path=/x"])
    assert args.ratios == [0.5, 0.25] and args.overrides == ["trainer=cpu", "data.path=/x"]
    args = parse_with_overrides(parser, ["--label=a", "--ratios", "0.5", "--", "trainer=cpu"])
    assert args.label == "a" and args.ratios == [0.5] and args.overrides == ["trainer=cpu"]
    assert parse_with_overrides(parser, ["--ratios", "1"]).overrides == []
    with pytest.raises(SystemExit):  # argparse alone: the override taken as a ratio
        parser.parse_args(["--ratios", "0.5", "trainer=cpu"])
