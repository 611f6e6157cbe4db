"""DIN / TWIN / DARE on a prepared CTR dataset with a plain PyTorch loop (no Lightning, Hydra, polars, MLflow).

For machines that lack the CPU stack, e.g. the benchmark GPU (torch + torchrec + pyarrow only):

    python -m benchmarks.ctr_plain --dataset .cache/data/ml100k-<fp> --models din twin dare --seeds 1 2 3 4 5 \
        --epochs 2 --device cuda --out benchmarks/results/dare_ml100k_runs.jsonl

It runs exactly what ``pipelines.train`` trains: the backbone built from ``configs/recsys/<model>.yaml``
(+ its ``twin`` base), the ``mtl=single`` tower, ``RankingTask.compute_losses`` (BCE + auxiliary head +
1e-6 L2), Adam lr 0.01 on tables and dense weights, N(0, 0.01) init, the same batch order (seeded by
seed and epoch), model selection by validation AUC, test metrics of the best epoch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from mtl.single import SingleTower
from recsys.data.batch import CTRBatch, make_ctr_kjt
from recsys.data.tasks import TaskSpec
from recsys.data.vocab import Vocab
from recsys.metrics.ranking import auc, gauc, logloss
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.system import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]


def backbone_kwargs(model: str) -> Dict:
    """configs/recsys/<model>.yaml merged over its ``twin`` base, without Hydra keys."""
    folder = REPO / "configs" / "recsys"
    base = yaml.safe_load((folder / "twin.yaml").read_text())
    own = yaml.safe_load((folder / f"{model}.yaml").read_text()) if model != "twin" else {}
    merged = {**base, **{k: v for k, v in own.items() if k != "defaults"}}
    return {k: v for k, v in merged.items() if not k.startswith("_")}


class Split:
    """One split as numpy arrays (hist values + offsets), batched like recsys.data.ctr_table."""

    def __init__(self, path: Path) -> None:
        table = pq.read_table(path, columns=["user", "item", "category", "label", "hist_item", "hist_cat"])
        self.user, self.item, self.category = (table[c].to_numpy() for c in ("user", "item", "category"))
        self.label = table["label"].to_numpy().astype(np.float32)
        hist = table["hist_item"].combine_chunks()
        self.offsets = np.asarray(hist.offsets, dtype=np.int64)
        self.hist_item = np.asarray(hist.values, dtype=np.int64)
        self.hist_cat = np.asarray(table["hist_cat"].combine_chunks().values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.user)

    def batch(self, rows: np.ndarray, device: torch.device) -> CTRBatch:
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        flat = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(lengths.sum())
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
        sparse = make_ctr_kjt(t(self.hist_item[flat]), t(self.hist_cat[flat]), t(lengths), t(self.item[rows]),
                              t(self.category[rows]))
        return CTRBatch(sparse=sparse, labels={"click": t(self.label[rows])}, user=t(self.user[rows]))


@torch.no_grad()
def evaluate(model: RankingModel, split: Split, device: torch.device, batch_size: int = 8192) -> Dict[str, float]:
    model.eval()
    preds = []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        preds.append(torch.sigmoid(model(split.batch(rows, device)).logits["click"]).float().cpu().numpy())
    model.train()
    p = np.concatenate(preds)
    return {"auc": auc(p, split.label), "logloss": logloss(p, split.label), "gauc_user": gauc(p, split.label, split.user),
            "gauc_category": gauc(p, split.label, split.category)}


def run(model_name: str, dataset: Path, seed: int, epochs: int, batch_size: int, device: torch.device,
        max_batches: int = 0) -> Dict:
    from recsys.tasks.ranking import RankingTask  # compute_losses: the training objective of pipelines.train

    meta = json.loads((dataset / "meta.json").read_text())
    vocab = Vocab(meta["num_users"], meta["num_items"], meta["num_categories"])
    splits = {s: Split(dataset / f"{s}.parquet") for s in ("train", "val", "test")}
    torch.manual_seed(seed)
    backbone = TargetAttentionBackbone(vocab, meta["max_len"], **backbone_kwargs(model_name))
    tasks = [TaskSpec("click")]
    model = RankingModel(backbone, SingleTower(backbone.output_dim, tasks), init_std=0.01).to(device)
    adam = lambda p: torch.optim.Adam(p, lr=0.01)
    task = RankingTask(model, tasks, adam, adam).to(device)
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
        if best is None or val["auc"] > best[0]["auc"]:
            best = (val, evaluate(model, splits["test"], device), epoch)
    val, test, best_epoch = best
    return {"model": model_name, "dataset": meta["name"], "seed": seed, "epochs": epochs, "batch_size": batch_size,
            "auc": test["auc"], "logloss": test["logloss"], "gauc_user": test["gauc_user"],
            "gauc_category": test["gauc_category"], "val_auc": val["auc"], "best_epoch": best_epoch,
            "sec_per_epoch": float(np.mean(epoch_seconds)), "peak_rss_mb": peak_rss_mb(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "run_id": "plain-loop"}


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
    args = parser.parse_args()
    device = torch.device(args.device)
    for seed in args.seeds:
        for model in args.models:
            row = run(model, args.dataset, seed, args.epochs, args.batch_size, device, args.max_batches)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
