"""DIN, TWIN and DARE (and TWIN-4E / TWIN w/ proj.) on MovieLens-100k CTR, paired seeds, trained to convergence.

    .venv/bin/python -m benchmarks.dare_ml100k [--models din twin dare] [--seeds 1 2 3 4 5] [--dims 16 64]
        [--patience 3] [--max-epochs 30] [--data ml100k] [--tag dare_ml100k] [--parallel N]
        [--run-timeout S] [--deadline S] [--report-only] [hydra overrides ...]

Each (model, dim, seed) is one ``python -m pipelines.train`` subprocess (so peak RSS is per run) with early
stopping on ``val/auc`` (``+callbacks.early_stopping`` with ``--patience``; ``--patience 0`` = no early
stopping, a fixed ``--max-epochs``); the test AUC is the best-validation checkpoint's. ``--dims`` sets
``recsys.embedding_dim`` and ``recsys.attention_dim`` together (DARE's attention table = its representation
width, as in the paper's dim-16 / dim-64 tables).

Paired seeds: ``seed=<s>`` sets ``data.seed`` (configs/data/*.yaml: ``seed: ${seed}``), i.e. the training
batch order, identically for every model; negatives are fixed by the dataset cache (``protocol.seed``), so
model i and model j at seed s see the same rows in the same order and differ only by the model.

Runs start in priority order: dims in the given order, then seeds, then models (so ``--dims 16 64`` finishes
every dim-16 seed before the first dim-64 run). ``--parallel N`` keeps N runs going at once (one subprocess and
one run folder each; with N > 1 each run also gets its own MLflow store ``<run folder>/mlflow.db``, as sqlite
stores take one writer; the dataset cache is prepared once before the first run, by ``pipelines.prepare``).
Every finished run's row is appended at once (by the one parent process), so a run that is cut leaves the
others' rows. ``--run-timeout`` kills a run (its process group) after that many seconds; ``--deadline`` is a
wall-clock budget in seconds from the start: no run starts after it and running ones are stopped at it.
``--report-only`` trains nothing and rewrites the summary from the raw rows (e.g. after appending rows from
another machine).

Raw rows (resumable: finished (model, dim, seed, patience, max_epochs) are skipped) go to
``<results>/<tag>_runs.jsonl``, each with ``dim``, ``patience``, ``best_epoch`` (1-based epoch of the highest
``val/auc`` in the run's MLflow history), ``epochs_run``, ``device`` and ``precision`` (the run's MLflow tags),
``parallel`` (runs sharing the machine) and ``seconds`` (the run's wall time); the summary (one object per model x
dim with ``best_epoch``, the median over its seeds, plus ``paired`` objects per dim: DARE - TWIN, and DARE - TWIN-4E /
TWIN w/ proj. where they ran, test AUC over the seeds both finished, with its 95 % Student-t interval)
to ``<results>/<tag>.jsonl`` and a markdown table into ``<results>/<tag>.md`` (between the markers
``<!-- <tag>:begin/end -->``; the rest of the file, hand-written notes and ``benchmarks/dare_official.py``'s
block, is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from benchmarks.common import (
    REPO,
    RESULTS,
    append_jsonl,
    machine_load,
    markdown_table,
    metric_history,
    paired_interval,
    parse_with_overrides,
    read_jsonl,
    replace_block,
    run_entry,
    run_tag,
    stop_on_sigterm,
    train,
    write_text_atomic,
)

EARLY_STOP = (
    "+callbacks.early_stopping={{_target_:pytorch_lightning.callbacks.EarlyStopping,"
    "monitor:val/auc,mode:max,patience:{}}}"
)


def overrides(model: str, data: str, dim: int, seed: int, patience: int, max_epochs: int, batch_size: int) -> list[str]:
    """The ``pipelines.train`` overrides of one run (early stopping on val/auc when ``patience > 0``)."""
    args = [
        f"recsys={model}",
        f"data={data}",
        f"seed={seed}",
        f"recsys.embedding_dim={dim}",
        f"recsys.attention_dim={dim}",
        f"trainer.max_epochs={max_epochs}",
        f"data.batch_size={batch_size}",
        "trainer.enable_progress_bar=false",
    ]
    return [*args, EARLY_STOP.format(patience)] if patience > 0 else args


def best_epoch(val_auc: list[float]) -> int:
    """1-based index of the first maximum of the per-epoch ``val/auc`` history (0 for an empty history)."""
    return 1 + max(range(len(val_auc)), key=lambda i: (val_auc[i], -i)) if val_auc else 0


def run_one(model: str, seed: int, dim: int, args: argparse.Namespace, work: Path, timeout: float | None) -> dict:
    """One ``pipelines.train`` run; its row. Raises ``RuntimeError`` if it fails, ``subprocess.TimeoutExpired``
    past ``timeout`` seconds (None: no limit)."""
    run_dir = work / f"{model}-d{dim}-seed{seed}-{int(time.time())}"
    store = run_dir if args.parallel > 1 else work  # sqlite stores take one writer: one store per parallel run
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    argv = overrides(model, args.data, dim, seed, args.patience, args.max_epochs, args.batch_size) + args.overrides
    run, metrics = train(argv, run_dir, env={"MLFLOW_TRACKING_URI": uri}, timeout=timeout)
    if not run.ok:
        raise RuntimeError(f"{model} dim {dim} seed {seed} failed:\n{run.stderr_tail}")
    val_auc = metric_history(uri, metrics["run_id"], ["val/auc"])["val/auc"]
    return {
        "model": model,
        "dataset": args.data,
        "dim": dim,
        "seed": seed,
        "patience": args.patience,
        "max_epochs": args.max_epochs,
        "best_epoch": best_epoch(val_auc),
        "epochs_run": len(val_auc),
        "batch_size": args.batch_size,
        "auc": metrics["test/auc"],
        "logloss": metrics["test/logloss"],
        "gauc_user": metrics["test/gauc_user"],
        "gauc_category": metrics["test/gauc_category"],
        "val_auc": metrics["val/auc"],
        "best_val_auc": max(val_auc) if val_auc else None,
        "sec_per_epoch": metrics["time/sec_per_epoch"],
        "seconds": run.seconds,
        "peak_rss_mb": metrics["system/peak_rss_mb"],
        "peak_gpu_mb": metrics.get("system/peak_gpu_mb"),
        "device": run_tag(uri, metrics["run_id"], "device"),
        "precision": run_tag(uri, metrics["run_id"], "precision"),
        "parallel": args.parallel,
        "run_id": metrics["run_id"],
        "mlflow_store": uri,
        "command": run.command,
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        "load": machine_load(),
    }


def prepare_data(args: argparse.Namespace) -> None:
    """``python -m pipelines.prepare`` with the runs' ``data`` / ``paths`` overrides: the cache every run reads,
    written once before parallel runs start (they would each prepare it otherwise)."""
    keep = ("data.", "data=", "+data.", "paths.", "seed=")
    extra = [o for o in args.overrides if o.startswith(keep)]
    run = run_entry("pipelines.prepare", [f"data={args.data}", *extra])
    if not run.ok:
        raise RuntimeError(f"preparing {args.data} failed:\n{run.stderr_tail}")


def run_grid(
    jobs: list[tuple[int, int, str]], args: argparse.Namespace, work: Path, raw_path: Path, start: float
) -> list[dict]:
    """Run ``jobs`` ((dim, seed, model), in priority order) ``args.parallel`` at a time; append each finished
    row to ``raw_path`` as it comes; ``args.deadline`` counts from ``start`` (``time.monotonic()``). Returns the
    new rows; failures and cut runs are reported on stderr."""
    deadline = start + args.deadline if args.deadline else float("inf")
    new: list[dict] = []
    failed: list[str] = []
    lock = threading.Lock()

    def one(job: tuple[int, int, str]) -> dict | None:
        dim, seed, model = job
        left = deadline - time.monotonic()
        if left < 1:
            with lock:
                failed.append(f"{model} dim {dim} seed {seed}: not started (deadline)")
            return None
        timeout = min(args.run_timeout or float("inf"), left)
        try:
            return run_one(model, seed, dim, args, work, timeout if timeout < float("inf") else None)
        except subprocess.TimeoutExpired:
            why = "deadline" if timeout == left else f"--run-timeout {args.run_timeout}"
            msg = f"{model} dim {dim} seed {seed}: stopped after {timeout:.0f} s ({why})"
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
            msg = f"{model} dim {dim} seed {seed}: {err}"
        with lock:
            failed.append(msg)
        return None

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        pending: set[Future] = {pool.submit(one, job) for job in jobs}  # the pool starts them in list order
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                row = future.result()
                if row is not None:
                    append_jsonl(raw_path, [row])
                    new.append(row)
                    print(json.dumps(row), flush=True)
    for msg in failed:
        print(f"[dare_ml100k] {msg}", file=sys.stderr, flush=True)
    print(
        f"[dare_ml100k] {len(new)} of {len(jobs)} runs finished in {time.monotonic() - start:.0f} s "
        f"(parallel {args.parallel})",
        file=sys.stderr,
        flush=True,
    )
    return new


def _median_epoch(rows: list[dict]) -> float | None:
    """Median best epoch over the runs (``None`` when a run has none: rows from before early stopping)."""
    epochs = [r.get("best_epoch") for r in rows]
    return None if None in epochs else statistics.median(epochs)


def summarise(rows: list[dict], models: list[str], dims: list[int]) -> list[dict]:
    """One object per (model, dim) with rows, then per dim one ``paired`` object for DARE - TWIN and for DARE
    against each other TWIN variant with common seeds."""
    out = []
    for dim in dims:
        for model in models:
            mine = [r for r in rows if r["model"] == model and r.get("dim", 16) == dim]
            if not mine:
                continue
            aucs = [r["auc"] for r in mine]
            out.append(
                {
                    "model": model,
                    "dataset": mine[0]["dataset"],
                    "dim": dim,
                    "seeds": sorted(r["seed"] for r in mine),
                    "patience": mine[0].get("patience"),
                    "auc_mean": statistics.mean(aucs),
                    "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                    "logloss_mean": statistics.mean(r["logloss"] for r in mine),
                    "gauc_user_mean": statistics.mean(r["gauc_user"] for r in mine),
                    "best_epochs": [r.get("best_epoch") for r in sorted(mine, key=lambda r: r["seed"])],
                    "best_epoch": _median_epoch(mine),
                    "sec_per_epoch": statistics.mean(r["sec_per_epoch"] for r in mine),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                    "runs_on": sorted({f"{r.get('device') or '?'} x{r.get('parallel', 1)}" for r in mine}),
                }
            )
        for baseline in ("twin", "twin_4e", "twin_proj"):  # DARE against each TWIN variant run with it
            out.extend(paired(rows, dim, "dare", baseline))
    return out


def paired(rows: list[dict], dim: int, a: str, b: str) -> list[dict]:
    """``a - b`` test AUC over the seeds both models finished at ``dim`` (empty without a common seed)."""
    by = {(r["model"], r["seed"]): r["auc"] for r in rows if r.get("dim", 16) == dim}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    if not seeds:
        return []
    mean, low, high = paired_interval([by[a, s] for s in seeds], [by[b, s] for s in seeds])
    return [{"paired": f"{a}-{b}", "dim": dim, "seeds": seeds, "auc_diff": mean, "ci95": [low, high]}]


def markdown(summary: list[dict]) -> str:
    """The summary's tables under a heading; ``runs on`` = device x runs sharing it (seconds per epoch grow with
    the sharing)."""
    models = [s for s in summary if "model" in s]
    body = [
        [
            s["model"],
            s["dim"],
            len(s["seeds"]),
            f"{s['auc_mean']:.4f} ± {s['auc_std']:.4f}",
            f"{s['logloss_mean']:.4f}",
            f"{s['gauc_user_mean']:.4f}",
            s["patience"],
            ",".join(str(e) for e in s["best_epochs"]),
            f"{s['sec_per_epoch']:.1f}",
            f"{s['peak_rss_mb']:.0f}",
            ", ".join(s.get("runs_on", [])),
        ]
        for s in models
    ]
    columns = ["model", "dim", "seeds", "test AUC (mean ± std)", "logloss", "GAUC user", "patience"]
    more = ["best epoch per seed", "s/epoch", "peak RSS (MB)", "runs on"]
    text = "### `benchmarks/dare_ml100k.py` summary (written by the script)\n\n"
    text += markdown_table([*columns, *more], body)
    pairs = [
        [p["paired"], p["dim"], len(p["seeds"]), f"{p['auc_diff']:+.4f}", f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"]
        for p in summary
        if "paired" in p
    ]
    if pairs:
        text += "\n" + markdown_table(["paired", "dim", "seeds", "test AUC difference", "95 % t-interval"], pairs)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["din", "twin", "dare"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--dims", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience on val/auc (0 = off)")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--data", default="ml100k", help="data config (configs/data/)")
    parser.add_argument("--tag", default="dare_ml100k", help="results file stem")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (subprocesses)")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is killed")
    parser.add_argument("--deadline", type=float, default=None, help="wall-clock budget (s): no run starts after")
    parser.add_argument("--report-only", action="store_true", help="train nothing; rewrite the summary")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parse_with_overrides(parser)
    start = time.monotonic()  # --deadline counts from here (preparing the data included)
    stop_on_sigterm()

    args.results.mkdir(parents=True, exist_ok=True)
    raw_path = args.results / f"{args.tag}_runs.jsonl"
    work = Path(os.environ.get("RECSYS_ROOT", REPO)) / "logs" / "benchmarks" / args.tag
    rows = read_jsonl(raw_path)
    done = {(r["model"], r.get("dim", 16), r["seed"], r.get("patience"), r.get("max_epochs")) for r in rows}
    jobs = [
        (dim, seed, model)
        for dim in args.dims
        for seed in args.seeds
        for model in args.models
        if (model, dim, seed, args.patience, args.max_epochs) not in done
    ]
    new: list[dict] = []
    if jobs and not args.report_only:
        if args.parallel > 1:
            prepare_data(args)
        new = run_grid(jobs, args, work, raw_path, start)
        rows += new
    mine = [r for r in rows if r.get("patience") == args.patience and r.get("max_epochs") == args.max_epochs]
    summary = summarise(mine, args.models, args.dims)
    write_text_atomic(args.results / f"{args.tag}.jsonl", "".join(json.dumps(s) + "\n" for s in summary))
    replace_block(args.results / f"{args.tag}.md", args.tag, markdown(summary))
    print(markdown(summary))
    if len(new) < len(jobs) and not args.report_only:
        sys.exit(1)  # some run failed or was cut (listed on stderr); the rows of the others are written


if __name__ == "__main__":
    main()
