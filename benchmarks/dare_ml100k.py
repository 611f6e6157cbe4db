"""DIN, TWIN and DARE on MovieLens-100k CTR, several seeds each (issue 2's benchmark; run by hand).

    .venv/bin/python -m benchmarks.dare_ml100k [--models din twin dare] [--seeds 1 2 3 4 5] [--epochs 2]

Each (model, seed) is one `python -m pipelines.train` subprocess (so peak RSS is per run), tracked in
the default MLflow store like any run. Raw results go to `benchmarks/results/dare_ml100k_runs.jsonl`
(resumable: finished pairs are skipped); the summary (one object per model: model, dataset, seeds,
auc_mean, auc_std, logloss_mean, sec_per_epoch, peak_rss_mb) to `benchmarks/results/dare_ml100k.jsonl`,
and a markdown table to `benchmarks/results/dare_ml100k.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import REPO, RESULTS, markdown_table


def run_one(model: str, seed: int, epochs: int, batch_size: int, extra: list[str]) -> dict:
    out_dir = REPO / "logs" / "benchmarks" / "dare_ml100k" / f"{model}-seed{seed}-{int(time.time())}"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.train",
        f"recsys={model}",
        "data=ml100k",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        f"data.batch_size={batch_size}",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out_dir}",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} seed {seed} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {
        "model": model,
        "dataset": "ml100k",
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "auc": metrics["test/auc"],
        "logloss": metrics["test/logloss"],
        "gauc_user": metrics["test/gauc_user"],
        "gauc_category": metrics["test/gauc_category"],
        "val_auc": metrics["val/auc"],
        "sec_per_epoch": metrics["time/sec_per_epoch"],
        "peak_rss_mb": metrics["system/peak_rss_mb"],
        "run_id": metrics["run_id"],
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
    }


def summarise(rows: list[dict], models: list[str]) -> list[dict]:
    out = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        aucs = [r["auc"] for r in mine]
        out.append(
            {
                "model": model,
                "dataset": "ml100k",
                "seeds": sorted(r["seed"] for r in mine),
                "auc_mean": statistics.mean(aucs),
                "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "logloss_mean": statistics.mean(r["logloss"] for r in mine),
                "sec_per_epoch": statistics.mean(r["sec_per_epoch"] for r in mine),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            }
        )
    return out


def markdown(summary: list[dict], rows: list[dict]) -> str:
    body = [
        [
            s["model"],
            len(s["seeds"]),
            f"{s['auc_mean']:.4f} ± {s['auc_std']:.4f}",
            f"{s['logloss_mean']:.4f}",
            f"{statistics.mean(r['gauc_user'] for r in rows if r['model'] == s['model']):.4f}",
            f"{s['sec_per_epoch']:.1f}",
            f"{s['peak_rss_mb']:.0f}",
        ]
        for s in summary
    ]
    columns = ["model", "seeds", "test AUC (mean ± std)", "logloss", "GAUC user", "s/epoch", "peak RSS (MB)"]
    return markdown_table(columns, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["din", "twin", "dare"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--tag", default="dare_ml100k", help="results file stem")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    raw_path = RESULTS / f"{args.tag}_runs.jsonl"
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in raw_path.read_text().splitlines()] if raw_path.exists() else []
    done = {(r["model"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for model in args.models:
            if (model, seed) in done:
                continue
            row = run_one(model, seed, args.epochs, args.batch_size, args.overrides)
            rows.append(row)
            with raw_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    summary = summarise(rows, args.models)
    (RESULTS / f"{args.tag}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in summary))
    (RESULTS / f"{args.tag}.md").write_text(markdown(summary, rows))
    print(markdown(summary, rows))


if __name__ == "__main__":
    main()
