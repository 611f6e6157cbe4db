"""Compare runs of one MLflow experiment without the UI: a table (markdown + CSV) and plots.

    python -m pipelines.compare experiment=ml100k metric=test/auc
    python -m pipelines.compare experiment=synthetic metric=test/auc curve_metric=val/auc out=docs/compare

Runs are grouped by their ``recsys``/``mtl`` tags (the model); seeds of one model give mean ± std.
Writes ``<out>/<experiment>_<metric>.{md,csv}``, ``..._final.png`` (final metric per model with error
bars) and ``..._curves.png`` (``curve_metric`` against epoch, one line per run).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from omegaconf import DictConfig

from pipelines._cli import entry_point
from recsys.errors import ConfigError
from recsys.io import atomic_write_bytes
from recsys.tracking.figures import pyplot, save_figure


def load_runs(tracking_uri: str, experiment: str, metric: str) -> pl.DataFrame:
    """One row per finished run that has ``metric``: run id/name, model, seed, metric value."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"experiment={experiment!r} not found in {tracking_uri}; experiments: {names}")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=10_000):
        if metric not in run.data.metrics or run.data.tags.get("sweep_parent") == "true":
            continue
        tags = run.data.tags
        model = tags.get("recsys", "?") + (f"-{tags['mtl']}" if tags.get("mtl") not in (None, "", "single") else "")
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "model": model,
                "seed": tags.get("seed", ""),
                metric: run.data.metrics[metric],
            }
        )
    if not rows:
        raise ConfigError(f"no run in experiment {experiment!r} has the metric {metric!r}")
    return pl.DataFrame(rows).sort(["model", "seed", "run_name"])


def summary_table(runs: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Per model: runs, mean, std (0 for one run), best."""
    return (
        runs.group_by("model", maintain_order=True)
        .agg(
            pl.len().alias("runs"),
            pl.col(metric).mean().alias("mean"),
            pl.col(metric).std().fill_null(0.0).alias("std"),
            pl.col(metric).max().alias("best"),
        )
        .sort("mean", descending=True)
    )


def to_markdown(table: pl.DataFrame, metric: str) -> str:
    lines = [f"| model | runs | {metric} mean ± std | best |", "|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        lines.append(f"| {r['model']} | {r['runs']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['best']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_final(table: pl.DataFrame, metric: str, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * table.height), 3.5))
    ax.bar(table["model"].to_list(), table["mean"].to_list(), yerr=table["std"].to_list(), capsize=4, color="#4c72b0")
    low = min(m - s for m, s in zip(table["mean"], table["std"]))
    high = max(m + s for m, s in zip(table["mean"], table["std"]))
    pad = max((high - low) * 0.5, 1e-3)
    ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per model (mean ± std over runs)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_curves(tracking_uri: str, runs: pl.DataFrame, metric: str, path: Path) -> None:
    plt = pyplot()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in runs.iter_rows(named=True):
        history = client.get_metric_history(r["run_id"], metric)
        if history:
            ax.plot(
                range(1, len(history) + 1),
                [h.value for h in history],
                marker="o",
                ms=3,
                label=f"{r['model']} s{r['seed']}",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def compare(tracking_uri: str, experiment: str, metric: str, curve_metric: str, out: Path) -> dict[str, Path]:
    runs = load_runs(tracking_uri, experiment, metric)
    table = summary_table(runs, metric)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{experiment}_{metric.replace('/', '_').replace('@', '')}"
    files = {
        "md": out / f"{stem}.md",
        "csv": out / f"{stem}.csv",
        "final": out / f"{stem}_final.png",
        "curves": out / f"{stem}_curves.png",
    }
    atomic_write_bytes(files["md"], to_markdown(table, metric).encode())
    atomic_write_bytes(files["csv"], runs.write_csv().encode())
    plot_final(table, metric, files["final"])
    plot_curves(tracking_uri, runs, curve_metric, files["curves"])
    print(to_markdown(table, metric))
    return files


@entry_point("compare")
def main(cfg: DictConfig) -> None:
    files = compare(cfg.tracking_uri, cfg.experiment, cfg.metric, cfg.curve_metric, Path(cfg.out))
    print("wrote " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
