"""Sequential-recommendation benchmark through the real command: SASRec, MQSA (λ_kd = 0), MQSA-TED and
MQSA-TED + MoH on the S3-Rec files (Beauty, Sports_and_Outdoors, Yelp), several seeds.

    python -m benchmarks.seqrec --models sasrec mqsa_ted --datasets beauty --seeds 0 --max-epochs 5
    python -m benchmarks.seqrec --trainer gpu --data-dir /data/seqrec   # every model x dataset, seeds 0 1 2
    python -m benchmarks.seqrec --protocol history_kept ...   # RecBole's ranking protocol: eval.exclude_history=false

Each (model, dataset, seed) is one ``python -m pipelines.train recsys=<model> data=<dataset> ...`` subprocess
(Lightning, MLflow and checkpoints on, as a user runs it) with ``data.test_each_epoch=true``, so the test split is
ranked after every epoch too (logged as ``epoch_test/*``; model selection and early stopping read validation
only). From the run's MLflow history the benchmark reads the per-epoch validation and test NDCG@10 and the
epoch wall times (training + validation + the extra test ranking), and computes ``seconds_to_recbole_best``:
the cumulative epoch time until the test NDCG@10 first reached RecBole SASRec's best test NDCG@10 on the same
data (Beauty 0.0414, Sports 0.0221, Yelp 0.0384; RecBole needed 93 / 126 / 153 s of training on an H200), or
null if never. The reported test metrics are those ``pipelines.train`` wrote for the best validation epoch.

Appends one JSON line per run to ``benchmarks/results/seqrec.jsonl`` and rebuilds ``seqrec.md``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    RESULTS,
    append_jsonl,
    log,
    machine_load,
    markdown_table,
    mean_std,
    metric_history,
    read_jsonl,
    train,
    write_text_atomic,
)

DATASETS = {"beauty": "Beauty.txt", "sports": "Sports_and_Outdoors.txt", "yelp": "Yelp.txt"}
# RecBole SASRec's best test NDCG@10 and its training seconds to reach it, on the same files and GPU
RECBOLE_BEST = {"beauty": (0.0414, 93.0), "sports": (0.0221, 126.0), "yelp": (0.0384, 153.0)}
MODELS: dict[str, list[str]] = {  # overrides on top of the configs' defaults (configs/recsys/*.yaml)
    "sasrec": ["recsys=sasrec"],
    "mqsa": ["recsys=mqsa_ted", "recsys.lambda_kd=0.0"],
    "mqsa_ted": ["recsys=mqsa_ted"],
    "mqsa_ted_moh": ["recsys=mqsa_ted", "recsys.attention=moh"],
}
METRICS = ("hr5", "hr10", "hr20", "ndcg5", "ndcg10", "ndcg20")


def seconds_to_reach(values: Sequence[float], epoch_seconds: Sequence[float], level: float) -> float | None:
    """Cumulative seconds of the epochs up to the first whose value is ``>= level`` (None if none is)."""
    total = 0.0
    for value, seconds in zip(values, epoch_seconds):
        total += seconds
        if value >= level:
            return round(total, 2)
    return None


def run_one(model: str, dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    path = args.data_dir / DATASETS[dataset] if dataset in DATASETS else Path(dataset)
    name = dataset if dataset in DATASETS else path.stem.lower()
    data = [f"data={dataset}"] if dataset in DATASETS else ["data=seqrec", f"data.name={name}"]
    run_dir = args.work / f"{model}-{name}-seed{seed}-{int(time.time())}"
    tracking_uri = f"sqlite:///{args.work / 'mlflow.db'}"
    overrides = [
        *MODELS[model],
        *data,
        f"data.path={path}",
        "data.test_each_epoch=true",
        f"seed={seed}",
        f"trainer.max_epochs={args.max_epochs}",
        f"callbacks.early_stopping.patience={args.patience}",
        f"eval.exclude_history={str(args.protocol == 'history_removed').lower()}",
        f"trainer={args.trainer}",
        "trainer.enable_progress_bar=false",
        *args.extra,
    ]
    log(f"[{model} {name} seed {seed}] {machine_load()}")
    run, metrics = train(overrides, run_dir, env={"MLFLOW_TRACKING_URI": tracking_uri})
    if not run.ok:
        raise RuntimeError(f"{run.command} failed:\n{run.stderr_tail}")
    history = metric_history(tracking_uri, metrics["run_id"], ["val/ndcg10", "epoch_test/ndcg10", "time/epoch_seconds"])
    epoch_times = [round(s, 3) for s in history["time/epoch_seconds"]]
    val = history["val/ndcg10"]
    level, recbole_seconds = RECBOLE_BEST.get(name, (None, None))
    return {
        "model": model,
        "dataset": name,
        "seed": seed,
        **{m: round(metrics[f"test/{m.rstrip('0123456789')}@{m.lstrip('hrndcg')}"], 6) for m in METRICS},
        "best_epoch": 1 + max(range(len(val)), key=val.__getitem__) if val else None,
        "sec_per_epoch": round(metrics["time/sec_per_epoch"], 3),
        "device": "cuda" if args.trainer == "gpu" else "cpu",
        "entry": "pipelines.train",
        "implementation": "ours",
        "protocol": args.protocol,
        "selection": f"val/ndcg@20, patience {args.patience}",
        "epoch_times": epoch_times,
        "val_ndcg10": [round(v, 6) for v in val],
        "test_ndcg10": [round(v, 6) for v in history["epoch_test/ndcg10"]],
        "seconds_to_recbole_best": seconds_to_reach(history["epoch_test/ndcg10"], epoch_times, level)
        if level
        else None,
        "recbole_seconds": recbole_seconds,
        "command": run.command,
        "machine_load": machine_load(),
    }


def write_table(rows: Sequence[dict[str, Any]], table: Path) -> None:
    """Mean ± std over seeds per (dataset, model, device)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (row["dataset"], row.get("protocol", "history_removed"), row["model"], row["device"])
        groups[(*key, row.get("entry", "plain loop"))].append(row)
    body = []
    for (dataset, protocol, model, device, entry), group in sorted(groups.items()):
        reached = [r["seconds_to_recbole_best"] for r in group if r.get("seconds_to_recbole_best") is not None]
        body.append(
            [dataset, protocol, model, device, entry, len(group)]
            + [mean_std([r[m] for r in group]) for m in METRICS]
            + [
                mean_std([r["best_epoch"] for r in group if r.get("best_epoch") is not None], 1),
                f"{min(r['sec_per_epoch'] for r in group):.2f}",
                f"{min(reached):.1f}" if reached else "–",
                RECBOLE_BEST.get(dataset, (None, "–"))[1],
            ]
        )
    columns = ["dataset", "protocol", "model", "device", "entry", "seeds", *METRICS, "best epoch", "s/epoch"]
    columns += ["s to RecBole best", "RecBole s"]
    text = (
        "# Sequential recommendation benchmark (`python -m benchmarks.seqrec`)\n\n"
        "Test metrics at the epoch of best validation NDCG@20 (full ranking; `protocol`: the user's history items "
        "removed from the ranking, `eval.exclude_history=true`, or kept), mean ± std over "
        "seeds; `s/epoch` = the fastest seed's epoch wall time (training + validation + the per-epoch test "
        "ranking); `s to RecBole best` = cumulative epoch time until test NDCG@10 first reached RecBole SASRec's "
        "best (the fastest seed). Rows with entry `plain loop` come from the deleted plain-loop harness.\n\n"
        + markdown_table(columns, body)
    )
    write_text_atomic(table, text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), help="beauty | sports | yelp | a file path")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "seqrec")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=20, help="epochs without a validation NDCG@20 gain")
    parser.add_argument(
        "--protocol",
        choices=["history_removed", "history_kept"],
        default="history_removed",
        help="history_removed: the official MQSA-TED / S3-Rec ranking; history_kept: RecBole's (eval.exclude_history)",
    )
    parser.add_argument("--trainer", default="default", help="configs/trainer option (gpu for one GPU)")
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "benchmarks" / "seqrec")
    parser.add_argument("--out", type=Path, default=RESULTS / "seqrec.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "seqrec.md")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets:
        for model in args.models:
            for seed in args.seeds:
                row = run_one(model, dataset, seed, args)
                append_jsonl(args.out, [row])
                rows.append(row)
                write_table(read_jsonl(args.out), args.table)
    return rows


if __name__ == "__main__":
    main()
