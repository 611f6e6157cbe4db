"""Peak RSS per rank and samples/s of DARE with Taobao-size tables: unsharded vs 2-way sharded on CPU.

    .venv/bin/python -m benchmarks.scale_memory --dim 16                                # unsharded
    .venv/bin/python -m benchmarks.scale_memory --dim 16 --dmp                          # DMP, 1 rank
    .venv/bin/torchrun --nproc_per_node 2 -m benchmarks.scale_memory --dim 16           # DMP, 2 ranks

Each run trains ``--steps`` steps through the same Lightning path as ``pipelines.train`` (``RankingModule``,
manual optimisation; ``TorchRecStrategy`` under DMP) on synthetic CTR samples in the Taobao schema
(``recsys.data.schema.SAMPLE_SCHEMA``: histories of ``--seq-len`` behaviours, uniform item ids in
[1, 4,068,791], category = f(item)), ``--batch-size`` rows per rank and step.

Optimisers are the same on both sides: plain SGD on the tables (unsharded: ``torch.optim.SGD`` over the
tables' dense gradients, which is how the single-process path trains; DMP: FBGEMM's fused EXACT_SGD,
no gradient materialised) and Adam on the dense weights. DMP shards item tables row-wise and category
tables table-wise (``configs/trainer/dmp.yaml``).

Reported per run (rank 0 appends one line to ``benchmarks/results/scale.jsonl``): ``peak_rss_mb`` = the
largest per-rank peak RSS (``getrusage``, whole process: Python, torch and Lightning included),
``samples_per_s`` = global samples per second over the steps after ``--warmup``. The per-rank numbers and
the machine load go to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pytorch_lightning as pl_
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from benchmarks.taobao_scale import (
    TAOBAO_CATEGORIES,
    TAOBAO_ITEMS,
    TAOBAO_USERS,
    append_result,
    build_dare,
    result_line,
)
from mtl.spec import TaskSpec
from recsys.data.ctr_table import CTRTable, identity_collate
from recsys.data.schema import SAMPLE_SCHEMA
from recsys.distributed.env import world_info
from recsys.training.ranking import RankingModule

LR_TABLES, LR_DENSE = 0.05, 0.001


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def taobao_batches(steps: int, batch_size: int, seq_len: int, seed: int) -> list:
    """``steps`` CTR batches in the Taobao sample schema (validated through :class:`CTRTable`)."""
    rng = np.random.default_rng(seed)
    rows = steps * batch_size

    def category(ids: np.ndarray) -> np.ndarray:  # a fixed item -> category map
        return ids % TAOBAO_CATEGORIES + 1

    def jagged(values: np.ndarray) -> pl.Series:
        offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * seq_len)
        return pl.Series(pa.LargeListArray.from_arrays(offsets, pa.array(values.ravel())))

    hist = rng.integers(1, TAOBAO_ITEMS + 1, size=(rows, seq_len))
    item = rng.integers(1, TAOBAO_ITEMS + 1, size=rows)
    frame = pl.DataFrame(
        {
            "user": rng.integers(1, TAOBAO_USERS + 1, size=rows),
            "item": item,
            "category": category(item),
            "label": rng.integers(0, 2, size=rows).astype(np.int8),
            "timestamp": np.arange(rows, dtype=np.int64),
            "hist_item": jagged(hist),
            "hist_cat": jagged(category(hist)),
        }
    ).cast(dict(SAMPLE_SCHEMA))
    table = CTRTable.from_frame(frame, "synthetic-taobao", {"click": "label"})
    return [table.batch(np.arange(i, i + batch_size)) for i in range(0, rows, batch_size)]


class StepTimer(pl_.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


class Batches(pl_.LightningDataModule):
    def __init__(self, batches: list) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=identity_collate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=16, help="width of every table (representation and attention)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512, help="rows per rank and step")
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--dmp", action="store_true", help="use TorchRecStrategy even with one process")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to scale.jsonl")
    args = parser.parse_args()

    info = world_info()
    sharded = args.dmp or info.world_size > 1
    torch.manual_seed(0)
    load = os.getloadavg()
    batches = taobao_batches(args.steps, args.batch_size, args.seq_len, seed=info.rank)
    model = build_dare(args.dim, args.seq_len, table_device=torch.device("meta") if sharded else None)
    task = RankingModule(
        model,
        [TaskSpec("click")],
        sparse_optimizer=functools.partial(torch.optim.SGD, lr=LR_TABLES),
        dense_optimizer=functools.partial(torch.optim.Adam, lr=LR_DENSE),
    )
    timer = StepTimer()
    common = dict(
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
        accelerator="cpu",
    )
    if sharded:
        from recsys.distributed.strategy import TorchRecStrategy

        strategy = TorchRecStrategy(
            sharding={"item": "row_wise", "category": "table_wise"},
            fused_optimizer={"name": "sgd", "lr": LR_TABLES},
            process_group_backend="gloo",
        )
        trainer = pl_.Trainer(strategy=strategy, devices=info.world_size, use_distributed_sampler=False, **common)
    else:
        trainer = pl_.Trainer(devices=1, **common)
    trainer.fit(task, datamodule=Batches(batches))

    step_s = float(np.mean(timer.times[args.warmup :]))
    per_rank, step_per_rank = [peak_rss_mb()], [step_s]
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank, step_per_rank = [None] * info.world_size, [None] * info.world_size
        dist.all_gather_object(per_rank, peak_rss_mb())
        dist.all_gather_object(step_per_rank, step_s)
        step_s = max(step_per_rank)  # ranks run in lock-step; the slowest sets the pace
    if info.world_size > 1:
        setting = f"sharded_{info.world_size}way"
    else:
        setting = "dmp_1rank" if sharded else "unsharded"
    samples_per_s = info.world_size * args.batch_size / step_s
    line = result_line(setting, info.world_size, "cpu", samples_per_s, args.dim, peak_rss_mb=max(per_rank))
    if info.is_zero:
        print(
            json.dumps(
                {
                    **line,
                    "per_rank_peak_rss_mb": [round(r, 1) for r in per_rank],
                    "step_s": round(step_s, 3),
                    "threads": torch.get_num_threads(),
                    "loadavg_at_start": [round(x, 2) for x in load],
                    "batch_per_rank": args.batch_size,
                    "seq_len": args.seq_len,
                    "steps": args.steps,
                }
            )
        )
        if not args.no_record:
            append_result(line)


if __name__ == "__main__":
    main()
