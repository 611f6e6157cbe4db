"""Sequential-recommendation benchmark: SASRec, MQSA (λ_kd = 0), MQSA-TED and MQSA-TED + MoH (75% heads)
on the S3-Rec files (Beauty, Sports_and_Outdoors, Yelp), seeds, early stopping on validation NDCG@20.

    python -m benchmarks.seqrec --models sasrec mqsa_ted --datasets beauty --seeds 0 --max-epochs 5
    python -m benchmarks.seqrec --device cuda            # all models x datasets x seeds 0 1 2, 200 epochs

A plain training loop over the package's own pieces — the S3-Rec reader and leave-one-out split
(``recsys.data.seqrec_format``), TED's graph (``recsys.data.transitions``), the models
(``recsys.models``), the losses and full-ranking scores (``recsys.losses.sequential``) and the metrics
(``recsys.metrics.topk``) — so it needs only torch, numpy and torchrec (no polars, Lightning, Hydra or
MLflow, no FBGEMM CUDA kernels) and runs the same code as ``python -m pipelines.train recsys=...``.

Protocol (the official MQSA-TED code): one sample per user per epoch (the last 50 training items),
Adam lr 1e-3 with L2 1e-4 (``weight_decay``), batch 256, validation and test evaluated after every
epoch, the test metrics of the epoch with the best validation NDCG@20 reported; stop after
``--patience`` epochs without improvement. ``sec_per_epoch`` = training + validation + test evaluation.

Each run appends one JSON line to ``benchmarks/results/seqrec.jsonl`` with exactly the fields
:data:`FIELDS`; the markdown table ``benchmarks/results/seqrec.md`` is rebuilt from all lines.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from recsys.data.seqrec_format import SeqTable, leave_one_out, read_sequences
from recsys.data.transitions import TransitionGraph, build_transition_graph, transition_pairs
from recsys.losses.sequential import sequential_losses
from recsys.metrics.topk import rank_metrics
from recsys.models.mqsa_ted import MQSATED
from recsys.models.sasrec import SASRec
from recsys.models.sequential import last_position_ranks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIELDS = (
    "model",
    "dataset",
    "seed",
    "hr5",
    "hr10",
    "hr20",
    "ndcg5",
    "ndcg10",
    "ndcg20",
    "best_epoch",
    "sec_per_epoch",
    "device",
)
DATASETS = {"beauty": "Beauty.txt", "sports": "Sports_and_Outdoors.txt", "yelp": "Yelp.txt"}
MOH_75 = {"num_heads": 4, "shared_heads": 2, "routed_topk": 1, "router": "learned", "balance_weight": 0.01}
MODELS: dict[str, tuple] = {  # the recsys configs' defaults (configs/recsys/{sasrec,mqsa_ted}.yaml)
    "sasrec": (SASRec, {}),
    "mqsa": (MQSATED, {"lambda_kd": 0.0}),
    "mqsa_ted": (MQSATED, {}),
    "mqsa_ted_moh": (MQSATED, {"attention": "moh", "moh": MOH_75}),
}
MAX_LEN = 50


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def training_graph(train: SeqTable, num_items: int, span: int) -> TransitionGraph:
    """TED's graph from the training split only."""
    src, dst = transition_pairs(
        torch.tensor(train.history.values),
        torch.tensor(train.targets.values),
        torch.tensor(train.history.lengths),
        span,
    )
    return build_transition_graph(src, dst, num_items)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: SASRec,
    table: SeqTable,
    graph: TransitionGraph | None,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    batch_size: int,
    device: torch.device,
) -> float:
    """One pass over the training users in a random order; returns the mean total loss."""
    model.train()
    order = rng.permutation(len(table))
    total, steps = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = table.batch(order[start : start + batch_size]).to(device, non_blocking=True)
        losses = sequential_losses(model, batch, graph)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        total, steps = total + losses["total"].detach(), steps + 1
    return float(total) / max(steps, 1)


def evaluate(model: SASRec, table: SeqTable, batch_size: int, device: torch.device) -> dict[str, float]:
    """HR/NDCG@5/10/20 over all users (full ranking, history removed, newest position only)."""
    model.eval()
    ranks = [
        last_position_ranks(model, table.batch(np.arange(s, min(s + batch_size, len(table)))).to(device))
        for s in range(0, len(table), batch_size)
    ]
    return rank_metrics(torch.cat(ranks).cpu())


def run_one(model_name: str, dataset: str, path: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model with early stopping; returns the JSON row (best-validation epoch's test metrics)."""
    device = torch.device(args.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seqs = read_sequences(path)
    splits = leave_one_out(seqs, MAX_LEN)
    cls, kwargs = MODELS[model_name]
    vocab = SimpleNamespace(num_users=seqs.num_users, num_items=seqs.num_items, num_categories=0)
    model = cls(vocab, MAX_LEN, device=device, **kwargs).to(device)
    graph = training_graph(splits["train"], seqs.num_items, model.kd_span).to(device) if model.lambda_kd > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best: dict[str, Any] = {"val": -math.inf, "epoch": 0, "test": {}}
    seconds: list[float] = []
    started = time.perf_counter()
    for epoch in range(1, args.max_epochs + 1):
        sync(device)
        t0 = time.perf_counter()
        loss = train_epoch(model, splits["train"], graph, opt, rng, args.batch_size, device)
        sync(device)
        t1 = time.perf_counter()
        val = evaluate(model, splits["val"], args.eval_batch_size, device)
        test = evaluate(model, splits["test"], args.eval_batch_size, device)
        sync(device)
        t2 = time.perf_counter()
        seconds.append(t2 - t0)
        if val["ndcg@20"] > best["val"]:
            best = {"val": val["ndcg@20"], "epoch": epoch, "test": test}
        log(
            f"{model_name} {dataset} seed {seed} epoch {epoch}: loss {loss:.4f} "
            f"train {t1 - t0:.1f}s eval {t2 - t1:.1f}s "
            f"val ndcg@20 {val['ndcg@20']:.4f} test ndcg@10 {test['ndcg@10']:.4f} hr@10 {test['hr@10']:.4f}"
        )
        if epoch - best["epoch"] >= args.patience:
            log(f"early stop: no validation gain for {args.patience} epochs")
            break
        if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            log(f"time budget of {args.time_budget_s}s used up after epoch {epoch}")
            break
    row = {
        "model": model_name,
        "dataset": dataset,
        "seed": seed,
        **{k.replace("@", ""): round(v, 6) for k, v in best["test"].items()},
        "best_epoch": best["epoch"],
        "sec_per_epoch": round(float(np.mean(seconds)), 3),
        "device": device.type,
    }
    log(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return {k: row[k] for k in FIELDS}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean ± std over seeds per (dataset, model, device)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["model"], row["device"])].append(row)
    metrics = ("hr5", "hr10", "hr20", "ndcg5", "ndcg10", "ndcg20")
    lines = [
        "# Sequential recommendation benchmark (`python -m benchmarks.seqrec`)",
        "",
        "Test metrics at the epoch of best validation NDCG@20 (full ranking, history removed), mean ± std over "
        "seeds; `sec/epoch` = training + validation + test evaluation, the fastest seed's (several runs may "
        "have shared the machine; see the notes below the table). Budgets and settings of each run: "
        "docs/seqrec.md.",
        "",
        "| dataset | model | device | seeds | " + " | ".join(metrics) + " | best epoch | sec/epoch |",
        "|---|---|---|---|" + "---|" * len(metrics) + "---|---|",
    ]
    for (dataset, model, device), group in sorted(groups.items()):

        def cell(key: str, digits: int = 4, group: list = group) -> str:
            values = np.array([r[key] for r in group], dtype=float)
            return f"{values.mean():.{digits}f}" + (f" ± {values.std():.{digits}f}" if len(values) > 1 else "")

        lines.append(
            f"| {dataset} | {model} | {device} | {len(group)} | "
            + " | ".join(cell(m) for m in metrics)
            + f" | {cell('best_epoch', 1)} | {min(r['sec_per_epoch'] for r in group):.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(row: dict[str, Any], out: Path, table: Path) -> None:
    """Append one JSON line, then rebuild the markdown table from every line of ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    tmp = table.with_suffix(".tmp")
    tmp.write_text(markdown_table(rows))
    tmp.replace(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        help=f"names in {list(DATASETS)} (files under --data-dir) or paths to S3-Rec style files",
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "seqrec")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=20, help="epochs without a validation NDCG@20 gain")
    parser.add_argument("--time-budget-s", type=float, default=0.0, help="stop a run after this much time (0 = none)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "seqrec.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "seqrec.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets:
        path = args.data_dir / DATASETS[dataset] if dataset in DATASETS else Path(dataset)
        name = dataset if dataset in DATASETS else path.stem.lower()
        for model in args.models:
            for seed in args.seeds:
                row = run_one(model, name, path, seed, args)
                write_results(row, args.out, args.table)
                log(json.dumps(row))
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
