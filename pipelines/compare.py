"""Compare runs of one MLflow experiment without the UI: a table (markdown + CSV) and plots.

    python -m pipelines.compare experiment=ml100k metric=test/auc
    python -m pipelines.compare experiment=synthetic metric=test/auc curve_metric=val/auc out=docs/compare

Runs are grouped by their whole config with the seed left out (the ``group_hash`` tag every training run
carries): runs of one group differ only in the seed and give mean ± std; a 1-epoch and a 2-epoch run of one model
are two groups, labelled by the config keys in which they differ. A rerun of a seed already in its group (same
config, same seed) is counted once, the latest. The grouping is printed and written with the table.
Writes ``<out>/<experiment>_<metric>.{md,csv}``, ``..._final.png`` (final metric per group with error bars) and
``..._curves.png`` (``curve_metric`` against epoch, one line per run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from omegaconf import DictConfig

from pipelines._cli import entry_point
from recsys.errors import ConfigError
from recsys.io import atomic_write_bytes
from recsys.tracking.figures import pyplot, save_figure
from recsys.tracking.mlflow import check_tracking_uri

# params that are not part of a group's identity (they vary between seeds, or name the run)
SEED_PARAMS = ("seed", "data.seed", "data.fingerprint", "run_name")


def model_name(tags: dict[str, str]) -> str:
    """``<recsys>[-<mtl>]`` from a run's tags (the single-task tower is left out)."""
    return tags.get("recsys", "?") + (f"-{tags['mtl']}" if tags.get("mtl") not in (None, "", "single") else "")


def load_runs(tracking_uri: str, experiment: str, metric: str) -> tuple[pl.DataFrame, list[str]]:
    """One row per finished run that has ``metric`` (run id/name, group, model, seed, metric), and notes on
    what was grouped or dropped. Sweep parents are left out (they summarise their children)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"experiment={experiment!r} not found in {tracking_uri}; experiments: {names}")
    runs = [
        r
        for r in client.search_runs([exp.experiment_id], max_results=10_000, order_by=["attributes.start_time DESC"])
        if metric in r.data.metrics and r.data.tags.get("sweep_parent") != "true"
    ]
    if not runs:
        raise ConfigError(f"no run in experiment {experiment!r} has the metric {metric!r}")
    notes: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    kept = []
    for run in runs:  # newest first: a rerun of the same config and seed replaces the older one
        tags = run.data.tags
        group = tags.get("group_hash") or f"run {run.info.run_id[:8]} (no group_hash tag)"
        key = (group, tags.get("seed", ""))
        if key in seen:
            notes.append(f"{run.info.run_name} ({run.info.run_id[:8]}): same config and seed as {seen[key]}, left out")
            continue
        seen[key] = f"{run.info.run_name} ({run.info.run_id[:8]})"
        kept.append(run)
    labels = group_labels(kept)
    rows = [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "group": labels[r.info.run_id],
            "group_hash": r.data.tags.get("group_hash", ""),
            "model": model_name(r.data.tags),
            "seed": r.data.tags.get("seed", ""),
            metric: r.data.metrics[metric],
        }
        for r in kept
    ]
    frame = pl.DataFrame(rows).sort(["group", "seed", "run_name"])
    for (group,), part in frame.group_by("group", maintain_order=True):
        seeds = ", ".join(part["seed"].to_list())
        notes.insert(0, f"{group}: {part.height} run(s), seeds {seeds} (config hash {part['group_hash'][0] or '-'})")
    return frame, notes


def group_labels(runs: list) -> dict[str, str]:
    """run id -> label of its group: the model name, plus the params in which its group differs from the other
    groups of the same model (e.g. ``dare (trainer.max_epochs=1)``)."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run.data.tags.get("group_hash") or run.info.run_id, []).append(run)
    by_model: dict[str, list[str]] = {}
    for group, members in groups.items():
        by_model.setdefault(model_name(members[0].data.tags), []).append(group)
    labels = {}
    for model, group_ids in by_model.items():
        params = {g: {k: v for k, v in groups[g][0].data.params.items() if k not in SEED_PARAMS} for g in group_ids}
        keys = sorted({k for p in params.values() for k in p})
        differing = [k for k in keys if len({p.get(k) for p in params.values()}) > 1]
        for g in group_ids:
            label = model
            if len(group_ids) > 1:
                shown = [f"{k}={params[g].get(k, '-')}" for k in differing[:3]]
                label += f" ({', '.join(shown) + (', ...' if len(differing) > 3 else '') if shown else g[:8]})"
            for run in groups[g]:
                labels[run.info.run_id] = label
    return labels


def summary_table(runs: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Per group: runs, mean, std (0 for one run), best."""
    return (
        runs.group_by("group", maintain_order=True)
        .agg(
            pl.len().alias("runs"),
            pl.col(metric).mean().alias("mean"),
            pl.col(metric).std().fill_null(0.0).alias("std"),
            pl.col(metric).max().alias("best"),
        )
        .sort("mean", descending=True)
    )


def to_markdown(table: pl.DataFrame, metric: str, notes: list[str] = ()) -> str:
    """The table, then how the runs were grouped (one line per group, then any rerun left out)."""
    lines = [f"| model | runs | {metric} mean ± std | best |", "|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        lines.append(f"| {r['group']} | {r['runs']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['best']:.4f} |")
    if notes:
        lines += ["", "Grouped by config (seed left out):", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot_final(table: pl.DataFrame, metric: str, path: Path) -> Any:
    """Bar per group (mean, error bar = std over seeds); the figure is returned after it is written."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * table.height), 4.0))
    labels = table["group"].to_list()
    ax.bar(range(len(labels)), table["mean"].to_list(), yerr=table["std"].to_list(), capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if max(map(len, labels)) > 12 else 0, ha="right")
    low = min(m - s for m, s in zip(table["mean"], table["std"]))
    high = max(m + s for m, s in zip(table["mean"], table["std"]))
    pad = max((high - low) * 0.5, 1e-3)
    ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}\nmean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, keep=True)


def curve_lines(histories: list[tuple[str, list]]) -> list[tuple[str, list[int], list[float]]]:
    """``[(label, metric history)]`` -> ``[(label, epochs, values)]``: one point per logged step (the last value
    when a step was logged twice, e.g. by a resumed run), epochs numbered from 1 as in the training-curve plot."""
    lines = []
    for label, history in histories:
        by_step = {h.step: h.value for h in sorted(history, key=lambda h: (h.step, h.timestamp))}
        if by_step:
            lines.append((label, list(range(1, len(by_step) + 1)), [by_step[s] for s in sorted(by_step)]))
    return lines


def plot_curves(tracking_uri: str, runs: pl.DataFrame, metric: str, path: Path) -> Any:
    """One line per run (``<group> s<seed>``, unique after :func:`load_runs`), against epoch (1 = first)."""
    plt = pyplot()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    histories = [
        (f"{r['group']} s{r['seed']}", client.get_metric_history(r["run_id"], metric))
        for r in runs.iter_rows(named=True)
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, epochs, values in curve_lines(histories):
        ax.plot(epochs, values, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path, keep=True)


def compare(tracking_uri: str, experiment: str, metric: str, curve_metric: str, out: Path) -> dict[str, Path]:
    check_tracking_uri(tracking_uri)  # a dead server: one line in seconds, not minutes of retries
    runs, notes = load_runs(tracking_uri, experiment, metric)
    table = summary_table(runs, metric)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{experiment}_{metric.replace('/', '_').replace('@', '')}"
    files = {
        "md": out / f"{stem}.md",
        "csv": out / f"{stem}.csv",
        "final": out / f"{stem}_final.png",
        "curves": out / f"{stem}_curves.png",
    }
    markdown = to_markdown(table, metric, notes)
    atomic_write_bytes(files["md"], markdown.encode())
    atomic_write_bytes(files["csv"], runs.write_csv().encode())
    pyplot().close(plot_final(table, metric, files["final"]))
    pyplot().close(plot_curves(tracking_uri, runs, curve_metric, files["curves"]))
    print(markdown)
    return files


@entry_point("compare")
def main(cfg: DictConfig) -> None:
    files = compare(cfg.tracking_uri, cfg.experiment, cfg.metric, cfg.curve_metric, Path(cfg.out))
    print("wrote " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
