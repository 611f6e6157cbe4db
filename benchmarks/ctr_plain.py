"""DIN / TWIN / DARE (× any ``mtl`` tower) on a prepared CTR dataset with a plain PyTorch loop (no Lightning,
Hydra, polars, MLflow).

For machines that lack the CPU stack, e.g. the benchmark GPU (torch + torchrec + pyarrow only):

    python -m benchmarks.ctr_plain --dataset .cache/data/ml100k-<fp> --models din twin dare --seeds 1 2 3 4 5 \
        --epochs 2 --device cuda --out benchmarks/results/dare_ml100k_runs.jsonl

Multi-task (``data=ml100k_mtl``'s click and like, a dataset folder with a ``like`` column):

    python -m benchmarks.ctr_plain --dataset .device/ml100k_mtl --models dare --tower mmoe \
        --tasks click:label like:like --out /tmp/mtl_runs.jsonl

It runs exactly what ``pipelines.train`` trains: the backbone built from ``configs/recsys/<model>.yaml``
(+ its ``twin`` base), the tower of ``configs/mtl/<tower>.yaml`` (default ``single``),
``RankingModule.compute_losses`` (BCE + auxiliary head +
1e-6 L2 + the tower's auxiliary losses), Adam lr 0.01 on tables and dense weights, N(0, 0.01) init, the same
batch order (seeded by seed and epoch), model selection by the mean validation AUC over tasks, test metrics of
the best epoch (per task under ``tasks`` when there are several).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from mtl.spec import TaskSpec
from recsys.data.batch import CTRBatch, make_ctr_kjt
from recsys.data.seqrec_format import take_segments
from recsys.data.vocab import Vocab
from recsys.metrics.ranking import auc, gauc, logloss
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.system import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]


def backbone_kwargs(model: str) -> dict:
    """configs/recsys/<model>.yaml merged over its ``twin`` base, without Hydra keys."""
    folder = REPO / "configs" / "recsys"
    base = yaml.safe_load((folder / "twin.yaml").read_text())
    own = yaml.safe_load((folder / f"{model}.yaml").read_text()) if model != "twin" else {}
    merged = {**base, **{k: v for k, v in own.items() if k != "defaults"}}
    return {k: v for k, v in merged.items() if not k.startswith("_")}


def build_tower(name: str, in_dim: int, tasks: list[TaskSpec]) -> torch.nn.Module:
    """The tower of ``configs/mtl/<name>.yaml`` (its ``_target_`` class with the file's arguments)."""
    cfg = yaml.safe_load((REPO / "configs" / "mtl" / f"{name}.yaml").read_text())
    module, _, cls = cfg.pop("_target_").rpartition(".")
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return getattr(importlib.import_module(module), cls)(in_dim=in_dim, tasks=tasks, **kwargs)


def parse_task(text: str) -> TaskSpec:
    """``name:column`` (binary task ``name`` reading label column ``column``); plain ``name`` reads ``label``."""
    name, _, column = text.partition(":")
    return TaskSpec(name, label=column or "label")


class Split:
    """One split as numpy arrays (hist values + offsets), batched like recsys.data.ctr_table."""

    def __init__(self, path: Path, tasks: Sequence[TaskSpec]) -> None:
        columns = sorted({t.label for t in tasks})
        table = pq.read_table(path, columns=["user", "item", "category", *columns, "hist_item", "hist_cat"])
        self.user, self.item, self.category = (table[c].to_numpy() for c in ("user", "item", "category"))
        self.labels = {t.name: table[t.label].to_numpy().astype(np.float32) for t in tasks}
        hist = table["hist_item"].combine_chunks()
        self.offsets = np.asarray(hist.offsets, dtype=np.int64)
        self.hist_item = np.asarray(hist.values, dtype=np.int64)
        self.hist_cat = np.asarray(table["hist_cat"].combine_chunks().values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.user)

    def batch(self, rows: np.ndarray, device: torch.device) -> CTRBatch:
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)  # noqa: E731
        sparse = make_ctr_kjt(
            t(take_segments(self.hist_item, starts, lengths).values),
            t(take_segments(self.hist_cat, starts, lengths).values),
            t(lengths),
            t(self.item[rows]),
            t(self.category[rows]),
        )
        labels = {name: t(values[rows]) for name, values in self.labels.items()}
        return CTRBatch(sparse=sparse, labels=labels, user=t(self.user[rows]))


@torch.no_grad()
def evaluate(
    model: RankingModel, split: Split, device: torch.device, batch_size: int = 8192
) -> dict[str, dict[str, float]]:
    """``{task: {auc, logloss, gauc_user, gauc_category}}`` over the whole split."""
    model.eval()
    preds: dict[str, list[np.ndarray]] = {name: [] for name in split.labels}
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        logits = model(split.batch(rows, device)).logits
        for name in preds:
            preds[name].append(torch.sigmoid(logits[name]).float().cpu().numpy())
    model.train()
    out = {}
    for name, parts in preds.items():
        p, y = np.concatenate(parts), split.labels[name]
        out[name] = {
            "auc": auc(p, y),
            "logloss": logloss(p, y),
            "gauc_user": gauc(p, y, split.user),
            "gauc_category": gauc(p, y, split.category),
        }
    return out


def mean_auc(metrics: dict[str, dict[str, float]]) -> float:
    return float(np.mean([m["auc"] for m in metrics.values()]))


def run(
    model_name: str,
    dataset: Path,
    seed: int,
    epochs: int,
    batch_size: int,
    device: torch.device,
    max_batches: int = 0,
    tower: str = "single",
    tasks: Sequence[TaskSpec] = (TaskSpec("click"),),
) -> dict:
    from recsys.training.ranking import RankingModule  # compute_losses: the training objective of pipelines.train

    meta = json.loads((dataset / "meta.json").read_text())
    vocab = Vocab(meta["num_users"], meta["num_items"], meta["num_categories"])
    tasks = list(tasks)
    splits = {s: Split(dataset / f"{s}.parquet", tasks) for s in ("train", "val", "test")}
    torch.manual_seed(seed)
    backbone = TargetAttentionBackbone(vocab, meta["max_len"], **backbone_kwargs(model_name))
    model = RankingModel(backbone, build_tower(tower, backbone.output_dim, tasks), init_std=0.01).to(device)

    def adam(p):
        return torch.optim.Adam(p, lr=0.01)

    task = RankingModule(model, tasks, adam, adam).to(device)
    optimizers = task.configure_optimizers()
    best, epoch_seconds = None, []
    for epoch in range(epochs):
        start = time.perf_counter()
        order = np.random.default_rng([seed, epoch]).permutation(len(splits["train"]))
        stop = len(order) if not max_batches else min(len(order), max_batches * batch_size)
        for b in range(0, stop, batch_size):
            batch = splits["train"].batch(order[b : b + batch_size], device)
            loss = task.compute_losses(batch, model(batch))["total"]
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
        val = evaluate(model, splits["val"], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - start)
        if best is None or mean_auc(val) > mean_auc(best[0]):
            best = (val, evaluate(model, splits["test"], device), epoch)
    val, test, best_epoch = best
    first = test[tasks[0].name]
    return {
        "model": model_name,
        "tower": tower,
        "dataset": meta["name"],
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "auc": first["auc"],
        "logloss": first["logloss"],
        "gauc_user": first["gauc_user"],
        "gauc_category": first["gauc_category"],
        "val_auc": mean_auc(val),
        "best_epoch": best_epoch,
        "tasks": test if len(tasks) > 1 else None,
        "sec_per_epoch": float(np.mean(epoch_seconds)),
        "peak_rss_mb": peak_rss_mb(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "run_id": "plain-loop",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="a prepared dataset folder (meta.json + splits)")
    parser.add_argument("--models", nargs="+", default=["din", "twin", "dare"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-batches", type=int, default=0, help="smoke tests: train batches per epoch (0 = all)")
    parser.add_argument("--towers", nargs="+", default=["single"], help="configs/mtl/<name>.yaml")
    parser.add_argument(
        "--tasks",
        nargs="+",
        type=parse_task,
        default=[TaskSpec("click")],
        help="name:label_column per task (default: click:label)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    for seed in args.seeds:
        for model, tower in itertools.product(args.models, args.towers):
            row = run(
                model, args.dataset, seed, args.epochs, args.batch_size, device, args.max_batches, tower, args.tasks
            )
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
