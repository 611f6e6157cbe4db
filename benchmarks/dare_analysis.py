"""DARE's mechanism analyses (paper §4.3-4.5) as a benchmark: retrieval quality, convergence, attention-dim efficiency.

    .venv/bin/python -m benchmarks.dare_analysis [--models din twin dare] [--seeds 1] [--dim 16] [--epochs 1]
        [--data synthetic] [--target-auc 0.75] [--val-every 0.25] [--ratios 0.5 0.25] [--tag dare_analysis]
        [--results benchmarks/results] [hydra overrides ...]

Every model is trained by ``python -m pipelines.train`` (validation ``1 / --val-every`` times per epoch through
``trainer.val_check_interval``), its bundle loaded with :func:`recsys.bundle.load_bundle` and its own forward
run; nothing here re-implements a model.

(a) ``retrieval_ndcg`` — NDCG@K of each model's top-K retrieved behaviours (``extras['topk_index']``, in the
    model's score order) on the test split's clicked rows, against a mutual-information ground truth estimated on
    the training split's clicked rows (:func:`mi_scores`): for a target of category ``t``, the behaviour at
    relative position ``p`` (1 = the latest) with category ``c`` scores ``MI(X_pc ; Y_t)``, the mutual information
    between the indicators ``X_pc = [history item at relative position p has category c]`` and
    ``Y_t = [target category = t]``, a plug-in estimate from the 2x2 table of counts (:func:`binary_mi`). The
    ground truth of a row is its top-20 behaviours by that score; their scores are the graded relevances (every
    other behaviour 0), :func:`ndcg_at_k`. ``value`` = the mean over rows.
(b) ``iters_to_acc`` — training steps (optimiser steps = batches, MLflow's step of ``val/auc``) until the
    validation AUC first reaches ``--target-auc``; ``value`` null when it never does within the run.
(c) ``att_dim_ratio`` — test AUC of DARE with ``recsys.attention_dim = dim * r`` (representation kept at ``dim``)
    and of TWIN with its one table shrunk to ``recsys.embedding_dim = dim * r``, for r in 1 and ``--ratios``.

Lines go to ``<results>/<tag>.jsonl`` (fields ``model, dataset, dim, seed, analysis, value, setting`` plus
``run_id``, ``command``, ``load``), a table to ``<results>/<tag>.md``; one MLflow run ``<tag>`` (experiment
``dare_analysis`` of the benchmark's store ``logs/benchmarks/<tag>/mlflow.db``) gets, per analysis, its plot
(``plots/<analysis>.png``) and its table (``tables/<analysis>.md``, every row recorded for the dataset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    REPO,
    RESULTS,
    append_jsonl,
    machine_load,
    markdown_table,
    mean_std,
    metric_steps,
    paired_interval,
    parse_with_overrides,
    read_jsonl,
    train,
    write_text_atomic,
)

GROUND_TRUTH_SIZE = 20


# ---------------------------------------------------------------- (a) ground truth and NDCG (pure numpy)
def relative_positions(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded, oldest-first histories ``[N, width]`` -> (relative position ``[N, width]``: 1 = the latest
    behaviour, ``length`` = the oldest; mask ``[N, width]`` of real slots)."""
    slots = np.arange(width)[None, :]
    mask = slots < lengths[:, None]
    return np.where(mask, lengths[:, None] - slots, 0), mask


def binary_mi(n11: np.ndarray, n1_: np.ndarray, n_1: np.ndarray, n: int) -> np.ndarray:
    """Plug-in mutual information (nats) of two binary variables from counts: ``n11`` rows with X=1 and Y=1,
    ``n1_`` with X=1, ``n_1`` with Y=1, ``n`` rows (broadcast elementwise); 0 log 0 = 0."""
    n11, n1_, n_1 = (np.asarray(a, dtype=np.float64) for a in (n11, n1_, n_1))
    cells = [
        (n11, n1_, n_1),
        (n1_ - n11, n1_, n - n_1),
        (n_1 - n11, n - n1_, n_1),
        (n - n1_ - n_1 + n11, n - n1_, n - n_1),
    ]
    out = np.zeros(np.broadcast(n11, n1_, n_1).shape)
    for joint, nx, ny in cells:
        with np.errstate(divide="ignore", invalid="ignore"):
            term = joint / n * np.log(joint * n / (nx * ny))
        out += np.where(joint > 0, term, 0.0)
    return out


def mi_scores(target_cat: np.ndarray, hist_cat: np.ndarray, lengths: np.ndarray, num_categories: int) -> np.ndarray:
    """``MI(X_pc ; Y_t)`` as ``[T, P + 1, C]`` (index ``[t, p, c]``; row ``p = 0`` unused) from ``N`` rows:
    ``target_cat [N]``, right-padded oldest-first ``hist_cat [N, P]``, ``lengths [N]``; ids in
    ``[0, num_categories]`` (T = C = num_categories + 1)."""
    n, width = hist_cat.shape
    size = num_categories + 1
    pos, mask = relative_positions(lengths, width)
    p, c = pos[mask], hist_cat[mask].astype(np.int64)
    t = np.broadcast_to(target_cat[:, None], mask.shape)[mask].astype(np.int64)
    n_t = np.bincount(target_cat, minlength=size).astype(np.float64)
    n_pc = np.bincount(p * size + c, minlength=(width + 1) * size).reshape(width + 1, size)
    n_tpc = np.bincount((t * (width + 1) + p) * size + c, minlength=size * (width + 1) * size)
    n_tpc = n_tpc.reshape(size, width + 1, size)
    return binary_mi(n_tpc, n_pc[None], n_t[:, None, None], n)


def ground_truth_relevance(
    scores: np.ndarray, target_cat: np.ndarray, hist_cat: np.ndarray, lengths: np.ndarray, top: int = GROUND_TRUTH_SIZE
) -> np.ndarray:
    """``[N, width]`` graded relevance: the MI score (:func:`mi_scores`) of each row's ``top`` highest-scoring
    behaviours, 0 for every other slot and for padding."""
    pos, mask = relative_positions(lengths, hist_cat.shape[1])
    rel = np.where(mask, scores[target_cat[:, None], pos, hist_cat], -np.inf)
    keep = np.argsort(-rel, axis=1, kind="stable")[:, :top]
    out = np.zeros(rel.shape)
    np.put_along_axis(out, keep, np.take_along_axis(rel, keep, axis=1), axis=1)
    return np.where(np.isfinite(out), np.maximum(out, 0.0), 0.0)


def ndcg_at_k(retrieved: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """``[N]`` NDCG@K of ``retrieved [N, K]`` slot indices (rank order) against ``relevance [N, width]``:
    ``sum_r rel[slot_r] / log2(r + 1)`` over the ideal ordering's value; rows without relevant slots -> NaN."""
    k = retrieved.shape[1]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(relevance, retrieved, axis=1) * discount).sum(axis=1)
    ideal = (-np.sort(-relevance, axis=1)[:, :k] * discount[: min(k, relevance.shape[1])]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


# ---------------------------------------------------------------- runs
@dataclass
class Trained:
    model: str
    seed: int
    run_dir: Path
    metrics: dict
    command: str
    setting: str


def _root() -> Path:
    """Where ``pipelines.train`` writes logs and caches (``paths.root_dir``: ``$RECSYS_ROOT`` or the checkout)."""
    return Path(os.environ.get("RECSYS_ROOT", REPO))


def _work(args: argparse.Namespace) -> Path:
    """This benchmark's runs, MLflow store and plots: ``<root>/logs/benchmarks/<tag>``."""
    return _root() / "logs" / "benchmarks" / args.tag


def _store(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def train_model(model: str, seed: int, dims: tuple[int, int], setting: str, args: argparse.Namespace) -> Trained:
    """One ``pipelines.train`` run with ``dims = (embedding_dim, attention_dim)`` (fixed ``--epochs``,
    validation every ``--val-every`` of an epoch)."""
    work = _work(args)
    run_dir = work / f"{model}-e{dims[0]}-a{dims[1]}-seed{seed}-{int(time.time())}"
    argv = [
        f"recsys={model}",
        f"data={args.data}",
        f"seed={seed}",
        f"recsys.embedding_dim={dims[0]}",
        f"recsys.attention_dim={dims[1]}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.val_check_interval={args.val_every}",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    run, metrics = train(argv, run_dir, env={"MLFLOW_TRACKING_URI": _store(work)})
    if not run.ok:
        raise RuntimeError(f"{model} seed {seed} ({setting}) failed:\n{run.stderr_tail}")
    return Trained(model, seed, run_dir, metrics, run.command, setting)


def _row(t: Trained, args: argparse.Namespace, analysis: str, value: float | None, setting: str) -> dict:
    return {
        "model": t.model,
        "dataset": args.label or args.data,
        "dim": args.dim,
        "seed": t.seed,
        "analysis": analysis,
        "value": value,
        "setting": setting,
        "run_id": t.metrics["run_id"],
        "command": t.command,
        "load": machine_load(),
        "invocation": " ".join(["python -m benchmarks.dare_analysis", *sys.argv[1:]]),
    }


def _cached_split(bundle_meta, split: str):
    from recsys.data.cache import cached_dataset
    from recsys.data.ctr_table import CTRTable

    root = _root() / ".cache" / "data"
    directory = cached_dataset(root, bundle_meta.name, bundle_meta.fingerprint)
    if directory is None:
        raise FileNotFoundError(f"no cached dataset {bundle_meta.name} {bundle_meta.fingerprint} under {root}")
    return CTRTable.read_parquet(directory / f"{split}.parquet", {"click": "label"}, bundle_meta.vocab())


def _positives(table, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, target categories, history categories ``[n, width]``, lengths) of the clicked rows."""
    rows = np.flatnonzero(table.labels["click"] > 0.5)
    _, hist_cat = table.padded(width)
    lengths = np.diff(table.hist_offsets)
    return rows, table.category[rows].astype(np.int64), hist_cat[rows].astype(np.int64), lengths[rows]


def retrieval_ndcg(t: Trained, args: argparse.Namespace, cache: dict) -> dict:
    from recsys.bundle import load_bundle

    loaded = load_bundle(t.run_dir / "model")
    meta = loaded.meta
    if meta.fingerprint not in cache:  # ground truth once per dataset, from the training split
        _, t_cat, h_cat, lens = _positives(_cached_split(meta, "train"), meta.max_len)
        cache[meta.fingerprint] = mi_scores(t_cat, h_cat, lens, meta.num_categories)
    scores = cache[meta.fingerprint]
    test = _cached_split(meta, "test")
    rows, t_cat, h_cat, lens = _positives(test, meta.max_len)
    retrieved = []
    with torch.no_grad():
        for lo in range(0, len(rows), 1024):
            batch = test.batch(rows[lo : lo + 1024], pad_to=meta.max_len)
            retrieved.append(loaded.model(batch).extras["topk_index"].numpy())
    top = np.concatenate(retrieved)
    relevance = ground_truth_relevance(scores, t_cat, h_cat, lens)
    ndcg = ndcg_at_k(top, relevance)
    setting = (
        f"NDCG@{top.shape[1]} vs top-{GROUND_TRUTH_SIZE} by MI(category, rel. position; target category) on train "
        f"clicks; {int(np.isfinite(ndcg).sum())} test clicks"
    )
    return _row(t, args, "retrieval_ndcg", float(np.nanmean(ndcg)), setting)


def iters_to_acc(t: Trained, args: argparse.Namespace) -> tuple[dict, list[tuple[int, float]]]:
    work = _work(args)
    curve = metric_steps(_store(work), t.metrics["run_id"], ["val/auc"])["val/auc"]
    step = next((s for s, v in curve if v >= args.target_auc), None)
    last = curve[-1][0] if curve else 0
    setting = (
        f"first step with val/auc >= {args.target_auc} (validation every {args.val_every} epoch; ran {last} steps)"
    )
    return _row(t, args, "iters_to_acc", step, setting), curve


# ---------------------------------------------------------------- plots and table
def _plots(rows: list[dict], curves: dict[str, list[tuple[int, float]]], args: argparse.Namespace) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = _work(args) / "plots"
    name = args.label or args.data
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    ndcg = [r for r in rows if r["analysis"] == "retrieval_ndcg"]
    if ndcg:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        models = sorted({r["model"] for r in ndcg})
        ax.bar(models, [np.mean([r["value"] for r in ndcg if r["model"] == m]) for m in models])
        ax.set(ylabel=f"NDCG@K vs MI top-{GROUND_TRUTH_SIZE}", title=f"retrieval quality ({name}, dim {args.dim})")
        paths["retrieval_ndcg"] = _save(fig, out_dir / "retrieval_ndcg.png")
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for run_name, curve in sorted(curves.items()):
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=run_name)
        ax.axhline(args.target_auc, color="grey", linestyle="--", label=f"target {args.target_auc}")
        ax.set(xlabel="training step", ylabel="val AUC", title=f"convergence ({name}, dim {args.dim})")
        ax.legend(fontsize=7)
        paths["iters_to_acc"] = _save(fig, out_dir / "iters_to_acc.png")
    ratio = [r for r in rows if r["analysis"] == "att_dim_ratio"]
    if ratio:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for model in sorted({r["model"] for r in ratio}):
            mine = sorted((r["ratio"], r["value"]) for r in ratio if r["model"] == model)
            ratios = sorted({x for x, _ in mine})
            ax.plot(ratios, [np.mean([v for x, v in mine if x == q]) for q in ratios], marker="o", label=model)
        ax.set(
            xlabel="attention dim / representation dim",
            ylabel="test AUC",
            title=f"attention-dim efficiency ({name})",
        )
        ax.legend()
        paths["att_dim_ratio"] = _save(fig, out_dir / "att_dim_ratio.png")
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_mlflow(paths: dict[str, Path], rows: list[dict], results: Path, args: argparse.Namespace) -> str:
    """One MLflow run: per analysis its plot (``plots/<analysis>.png``) and its table (``tables/<analysis>.md``,
    the markdown lines of ``rows`` for that analysis), plus the jsonl results file."""
    import mlflow

    mlflow.set_tracking_uri(_store(_work(args)))
    mlflow.set_experiment("dare_analysis")
    with mlflow.start_run(run_name=args.tag) as run:
        params = {"data": args.label or args.data, "dim": args.dim, "epochs": args.epochs}
        mlflow.log_params({**params, "target_auc": args.target_auc})
        for path in paths.values():
            mlflow.log_artifact(str(path), "plots")
        for analysis in dict.fromkeys(r["analysis"] for r in rows):
            mlflow.log_text(_table([r for r in rows if r["analysis"] == analysis]), f"tables/{analysis}.md")
        mlflow.log_artifact(str(results))
        return run.info.run_id


def _fmt(value) -> str:
    if value is None:
        return "not reached"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """Title, the invocations with the machine load seen by their rows, then one table line per result."""
    text = [
        "# DARE mechanism analyses (issue 16; `benchmarks/dare_analysis.py`)\n",
        "Written by the script from `dare_analysis.jsonl` (every value measured by the run named in its row;"
        " see the script's docstring for the definitions). Invocations and machine load at each result:\n",
    ]
    for invocation in dict.fromkeys(r.get("invocation", "?") for r in rows):
        loads = [r["load"] for r in rows if r.get("invocation", "?") == invocation]
        text.append(f"- `{invocation}` — {loads[0]} (first result) … {loads[-1]} (last)")
    return "\n".join(text) + "\n\n" + summary(rows) + "\n### Every result\n\n" + _table(rows)


def _measure(row: dict) -> str:
    """What a row measures, seeds aside: the analysis, and for ``att_dim_ratio`` its ratio."""
    return f"{row['analysis']} {row['ratio']:g}" if row["analysis"] == "att_dim_ratio" else row["analysis"]


def summary(rows: list[dict]) -> str:
    """Per dataset, dim and measure: each model's mean ± std over seeds (how many seeds reached a value) and the
    paired DARE - TWIN difference over the seeds both have, with its 95 % interval."""
    groups: dict[tuple, dict[str, dict[int, float | None]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["dim"], _measure(r)), {}).setdefault(r["model"], {})[r["seed"]] = r["value"]
    body = []
    for (dataset, dim, measure), by_model in groups.items():
        cells, digits = [], 0 if measure == "iters_to_acc" else 4
        for model in ("din", "twin", "dare"):
            seeds = by_model.get(model, {})
            values = [v for v in seeds.values() if v is not None]
            cells.append(f"{mean_std(values, digits)} ({len(values)}/{len(seeds)})" if seeds else "–")
        twin, dare = by_model.get("twin", {}), by_model.get("dare", {})
        both = sorted(s for s in dare if s in twin and dare[s] is not None and twin[s] is not None)
        paired = "–"
        if both:
            mean, low, high = paired_interval([dare[s] for s in both], [twin[s] for s in both])
            paired = f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (n = {len(both)})"
        body.append([dataset, dim, measure, *cells, paired])
    columns = ["dataset", "dim", "measure", "DIN (seeds with a value)", "TWIN", "DARE", "DARE - TWIN, paired [95 %]"]
    return "### Over seeds\n\n" + markdown_table(columns, body)


def _table(rows: list[dict]) -> str:
    body = [
        [r["analysis"], r["model"], r["dataset"], r["dim"], r["seed"], _fmt(r["value"]), r["setting"]] for r in rows
    ]
    return markdown_table(["analysis", "model", "dataset", "dim", "seed", "value", "setting"], body)


def write_report(args: argparse.Namespace) -> None:
    """``<tag>.md`` from every row recorded in ``<tag>.jsonl``."""
    write_text_atomic(args.results / f"{args.tag}.md", markdown(read_jsonl(args.results / f"{args.tag}.jsonl")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["din", "twin", "dare"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--label", help="dataset name in the rows (default: --data), e.g. for a generator variant")
    parser.add_argument("--target-auc", type=float, default=0.75)
    parser.add_argument("--val-every", type=float, default=0.25, help="trainer.val_check_interval (epochs)")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.25])
    parser.add_argument("--analyses", nargs="+", default=["retrieval_ndcg", "iters_to_acc", "att_dim_ratio"])
    parser.add_argument("--tag", default="dare_analysis")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite <tag>.md from <tag>.jsonl, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parse_with_overrides(parser)
    if args.report_only:
        write_report(args)
        return

    out_path = args.results / f"{args.tag}.jsonl"
    rows: list[dict] = []
    curves: dict[str, list[tuple[int, float]]] = {}
    gt_cache: dict = {}
    for seed in args.seeds:
        base = {m: train_model(m, seed, (args.dim, args.dim), "base", args) for m in args.models}
        for model, t in base.items():
            new = []
            if "retrieval_ndcg" in args.analyses:
                new.append(retrieval_ndcg(t, args, gt_cache))
            if "iters_to_acc" in args.analyses:
                row, curves[f"{model} seed {seed}"] = iters_to_acc(t, args)
                new.append(row)
            if "att_dim_ratio" in args.analyses and model in ("dare", "twin"):
                new.append(
                    {**_row(t, args, "att_dim_ratio", t.metrics["test/auc"], "ratio 1 (test AUC)"), "ratio": 1.0}
                )
            append_jsonl(out_path, new)
            rows += new
        if "att_dim_ratio" not in args.analyses:
            continue
        for ratio in args.ratios:
            small = max(1, round(args.dim * ratio))
            shrunk = {
                "dare": ((args.dim, small), f"ratio {ratio}: attention_dim={small}, repr {args.dim}"),
                "twin": ((small, small), f"ratio {ratio}: one table of dim {small}"),
            }
            for model, (dims, setting) in shrunk.items():
                if model not in args.models:
                    continue
                t = train_model(model, seed, dims, setting, args)
                row = {**_row(t, args, "att_dim_ratio", t.metrics["test/auc"], f"{setting} (test AUC)"), "ratio": ratio}
                append_jsonl(out_path, [row])
                rows.append(row)
    label = args.label or args.data  # bars and ratio lines over every seed recorded for this dataset so far
    recorded = [r for r in read_jsonl(out_path) if r["dataset"] == label]
    paths = _plots(recorded, curves, args)
    run_id = _log_mlflow(paths, recorded, out_path, args)
    write_report(args)
    print(markdown(rows))
    print(f"plots logged to MLflow run {run_id} ({_store(_work(args))})")


if __name__ == "__main__":
    main()
