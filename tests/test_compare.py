"""pipelines.compare on a hand-filled MLflow store: grouping by config (seed left out), reruns counted once, and
plots whose legends, epochs and titles a person can read."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipelines.compare import compare, load_runs, plot_final, summary_table
from recsys.tracking.callbacks import plot_curves as plot_training_curves

# an MLflow sqlite store is created (schema migrations: ~20 s on 2 cores)
pytestmark = pytest.mark.slow


def _run(client, exp, recsys, group, seed, auc, epochs, val_aucs):
    run = client.create_run(
        exp, run_name=f"{recsys}-synthetic-{group}", tags={"recsys": recsys, "group_hash": group, "seed": str(seed)}
    )
    rid = run.info.run_id
    for key, value in {"seed": seed, "data.seed": seed, "trainer.max_epochs": epochs, "recsys.top_k": 20}.items():
        client.log_param(rid, key, value)
    client.log_metric(rid, "test/auc", auc)
    for step, value in enumerate(val_aucs):
        client.log_metric(rid, "val/auc", value, step=100 * (step + 1))
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("synthetic", artifact_location=str(tmp_path / "art"))
    _run(client, exp, "dare", "aaaa1111", 1, 0.70, 1, [0.6])
    _run(client, exp, "dare", "aaaa1111", 2, 0.72, 1, [0.62])
    _run(client, exp, "dare", "aaaa1111", 2, 0.80, 1, [0.63])  # a rerun of seed 2: counted once (the latest)
    _run(client, exp, "dare", "bbbb2222", 1, 0.75, 2, [0.6, 0.7])  # 2 epochs: another group
    _run(client, exp, "din", "cccc3333", 1, 0.65, 1, [0.55])  # another model of the same sweep
    return uri


def test_runs_are_grouped_by_config_without_the_seed(store):
    runs, notes = load_runs(store, "synthetic", "test/auc")
    table = {r["group"]: r for r in summary_table(runs, "test/auc").iter_rows(named=True)}
    assert set(table) == {"dare (trainer.max_epochs=1)", "dare (trainer.max_epochs=2)", "din"}
    one_epoch = table["dare (trainer.max_epochs=1)"]
    assert one_epoch["runs"] == 2 and one_epoch["mean"] == pytest.approx((0.70 + 0.80) / 2)
    assert table["dare (trainer.max_epochs=2)"]["runs"] == 1 and table["din"]["mean"] == pytest.approx(0.65)
    assert any("same config and seed" in n and "left out" in n for n in notes)
    assert any(n.startswith("dare (trainer.max_epochs=1): 2 run(s), seeds 1, 2") for n in notes)


def test_compare_writes_what_it_grouped_and_readable_plots(store, tmp_path):
    files = compare(store, "synthetic", "test/auc", "val/auc", tmp_path / "out")
    markdown = files["md"].read_text()
    assert "| dare (trainer.max_epochs=1) | 2 |" in markdown and "Grouped by config (seed left out)" in markdown
    assert files["final"].stat().st_size > 1000 and files["curves"].stat().st_size > 1000


def test_curves_legend_is_unique_and_epochs_count_from_one(store, tmp_path):
    from pipelines.compare import plot_curves

    runs, _ = load_runs(store, "synthetic", "test/auc")
    fig = plot_curves(store, runs, "val/auc", tmp_path / "curves.png")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == len(set(labels)) == 4
    for line in fig.axes[0].get_lines():
        assert list(line.get_xdata()) == list(range(1, len(line.get_xdata()) + 1))


def test_training_curves_count_epochs_from_one_like_compare(tmp_path, monkeypatch):
    """The run's own training-curve plot and compare's curves put epoch 1 at the first epoch."""
    import recsys.tracking.callbacks as callbacks
    from recsys.tracking import figures

    kept = []
    monkeypatch.setattr(callbacks, "save_figure", lambda fig, path, title: kept.append(fig) or path)
    history = [{"epoch": 1.0, "train/loss": 0.7, "val/auc": 0.6}, {"epoch": 2.0, "train/loss": 0.6, "val/auc": 0.7}]
    plot_training_curves(history, tmp_path / "training_curves.png", "run")
    for ax in kept[0].axes:
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1.0, 2.0]]
    figures.pyplot().close(kept[0])


def test_final_plot_title_and_labels_fit_in_the_figure(store, tmp_path):
    runs, _ = load_runs(store, "synthetic", "test/auc")
    fig = plot_final(summary_table(runs, "test/auc").head(1), "test/ndcg@10_long_metric_name", tmp_path / "f.png")
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    for text in [fig.axes[0].title, *fig.axes[0].get_xticklabels()]:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width, (text.get_text(), box, width)


def test_experiment_opens_in_the_model_training_view_and_paths_are_tags(tmp_path):
    """The MLflow UI reads the experiment tag mlflow.experimentKind; machine paths go to tags, not params."""
    from recsys.tracking.mlflow import build_logger, mark_model_training, params_and_path_tags

    logger = build_logger(f"sqlite:///{tmp_path}/m.db", str(tmp_path / "art"), "synthetic", run_name="r")
    mark_model_training(logger.experiment, logger.experiment_id)
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db").get_experiment(logger.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    config = {
        "seed": 0,
        "paths": {"root_dir": "/home/u/repo", "log_dir": "/home/u/repo/logs"},
        "data": {"name": "ml100k", "path": "/data/ml-100k", "cache_dir": "/c", "batch_size": 512},
        "recsys": {"top_k": 20},
        "trainer": {"max_epochs": 2},
        "logger": {"tracking_uri": "sqlite:///x.db", "artifact_location": "/a"},
    }
    params, path_tags = params_and_path_tags(config)
    assert params == {
        "seed": 0,
        "data.name": "ml100k",
        "data.batch_size": 512,
        "recsys.top_k": 20,
        "trainer.max_epochs": 2,
    }
    assert path_tags["path.paths.root_dir"] == "/home/u/repo" and path_tags["path.data.path"] == "/data/ml-100k"
    assert set(path_tags) == {
        "path.paths.root_dir",
        "path.paths.log_dir",
        "path.data.path",
        "path.data.cache_dir",
        "path.logger.tracking_uri",
        "path.logger.artifact_location",
    }
