"""DARE training throughput on one GPU, torch-native path: unsharded TorchRec tables, no FBGEMM CUDA kernels.

    python -m benchmarks.gpu_throughput                       # dims 16 and 128, both table optimisers
    python -m benchmarks.gpu_throughput --dims 16 --table-optims sparse_adam --steps 200
    python -m benchmarks.gpu_throughput --device cpu --items 100000 --batch-size 64 --steps 3 --warmup 1  # smoke

Needs torch (CUDA), torchrec importable (its CPU fbgemm wheel is enough; no CUDA kernels are used) and
this repository's model code; it imports neither Lightning, MLflow, Hydra nor polars, and the timed loop
is plain PyTorch. Batches are synthetic and generated on the GPU (a pool of ``--pool``
batches, cycled): Taobao vocabulary (4,068,791 items, 9,408 categories), histories of ``--seq-len``
(uniform ids; every history ``--seq-len`` long unless ``--min-len`` is lower), K = ``--top-k``.

Each step is what ``RankingModule.training_step`` does: forward, BCE + auxiliary-head BCE + 1e-6 L2 on
dense weights, backward, optimiser steps (dense: Adam; tables: ``--table-optims``):

* ``dense_adam``: ``torch.optim.Adam`` over the tables' dense gradients (the repository's default
  single-process path: every step reads and writes every row of every table);
* ``sparse_adam``: tables emit sparse gradients (``nn.Embedding.sparse``) and ``torch.optim.SparseAdam``
  updates only the looked-up rows.

Prints one JSON line per (dim, table optimiser) in the ``benchmarks/results/scale.jsonl`` format
(``--record`` also appends it there), followed by a line with the timing details and the arithmetic floor
(see :func:`floor_bytes_per_sample` and ``benchmarks/results/scale.md``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.taobao_scale import (
    TAOBAO_CATEGORIES,
    TAOBAO_ITEMS,
    TAOBAO_USERS,
    append_result,
    build_dare,
    result_line,
)
from recsys.data.batch import CTRBatch, make_ctr_kjt

HBM_BYTES_PER_S = 4.3e12  # H200 (the figure)


def synthetic_batch(batch: int, seq_len: int, min_len: int, items: int, device: torch.device) -> CTRBatch:
    """One CTR batch in the Taobao schema, generated on ``device``."""
    lengths = torch.randint(min_len, seq_len + 1, (batch,), device=device)
    total = int(lengths.sum())
    hist_item = torch.randint(1, items + 1, (total,), device=device)
    target_item = torch.randint(1, items + 1, (batch,), device=device)
    category = lambda ids: ids % TAOBAO_CATEGORIES + 1  # noqa: E731  fixed item -> category map
    sparse = make_ctr_kjt(hist_item, category(hist_item), lengths, target_item, category(target_item))
    labels = {"click": torch.randint(0, 2, (batch,), device=device).float()}
    return CTRBatch(sparse=sparse, labels=labels, user=torch.randint(1, TAOBAO_USERS + 1, (batch,), device=device))


def table_params(model: nn.Module) -> list[nn.Parameter]:
    from torchrec import EmbeddingCollection

    return [p for m in model.modules() if isinstance(m, EmbeddingCollection) for p in m.parameters()]


def loss_fn(model: nn.Module, batch: CTRBatch, dense: list[nn.Parameter], l2_names: set) -> torch.Tensor:
    """RankingModule.compute_losses for one binary task: BCE + aux BCE (weight 1) + 1e-6 * L2(dense weights)."""
    out = model(batch)
    label = batch.labels["click"]
    loss = F.binary_cross_entropy_with_logits(out.logits["click"], label)
    for logit in out.aux_logits.values():
        loss = loss + F.binary_cross_entropy_with_logits(logit, label)
    l2 = torch.stack([p.pow(2).sum() for p in dense if id(p) in l2_names]).sum()
    return loss + 1e-6 * l2


def floor_bytes_per_sample(dim: int, seq_len: int, batch: int, table_optim: str, items: int) -> dict[str, float]:
    """Bytes a step must move per sample, fp32, assuming perfect kernels (see scale.md).

    * lookups: 4 tables x (seq_len + 1) rows x dim, read once (forward) and their gradient written once;
    * table update: ``sparse_adam`` read-modify-writes (w, m, v read + grad read; w, m, v written: 7 words)
      each looked-up item row (uniform ids over 4M rows: nearly all distinct) and each category row
      touched in the batch (at most 9,409 per table, amortised over the batch); ``dense_adam`` touches
      every row of every table (7 words + zeroing the gradient: 8 words);
    * activations: the padded [seq_len, 3*dim] history of each role read once forward, once backward.
    """
    word = 4
    lookups = 4 * (seq_len + 1) * dim * word * 2
    if table_optim == "sparse_adam":
        item_rows = 2 * (seq_len + 1)  # per sample, two item tables
        cat_rows = 2 * min(TAOBAO_CATEGORIES + 1, batch * (seq_len + 1)) / batch
        update = (item_rows + cat_rows) * 7 * dim * word
    else:
        update = 2 * (items + 1 + TAOBAO_CATEGORIES + 1) * 8 * dim * word / batch
    activations = 2 * 2 * seq_len * 3 * dim * word
    total = lookups + update + activations
    return {
        "lookups": lookups,
        "table_update": update,
        "activations": activations,
        "total": total,
        "floor_samples_per_s": HBM_BYTES_PER_S / total,
    }


def run(dim: int, table_optim: str, args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_dare(dim, args.seq_len, args.top_k, table_device=device, items=args.items).to(device)
    tables = table_params(model)
    ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in ids]
    names = {id(p): n for n, p in model.named_parameters()}
    l2_names = {id(p) for p in dense if p.dim() > 1 and not names[id(p)].endswith("bias")}
    fused = device.type == "cuda"
    optims: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=0.01, fused=fused)]
    if table_optim == "sparse_adam":
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.weight.shape[0] > args.seq_len + 1:  # not the position tables
                m.sparse = True
        optims.append(torch.optim.SparseAdam(tables, lr=0.01))
    elif table_optim == "dense_adam":
        optims.append(torch.optim.Adam(tables, lr=0.01, fused=fused))
    else:
        raise SystemExit(f"unknown --table-optims entry '{table_optim}': dense_adam | sparse_adam")
    pool = [synthetic_batch(args.batch_size, args.seq_len, args.min_len, args.items, device) for _ in range(args.pool)]
    step_fn = lambda b: loss_fn(model, b, dense, l2_names)  # noqa: E731
    if args.compile:
        step_fn = torch.compile(step_fn, dynamic=True)  # experimental: graph breaks at host syncs
    model.train()

    def step(i: int) -> None:
        for opt in optims:
            opt.zero_grad(set_to_none=True)
        step_fn(pool[i % len(pool)]).backward()
        for opt in optims:
            opt.step()

    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    seconds = time.perf_counter() - start
    samples_per_s = args.steps * args.batch_size / seconds
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting = f"1gpu_torch_native_{table_optim}_b{args.batch_size}_l{args.seq_len}_k{args.top_k}"
    line = result_line(setting, 1, name, samples_per_s, dim, peak_gpu_mb=peak, items=args.items)
    print(json.dumps(line), flush=True)
    floor = floor_bytes_per_sample(dim, args.seq_len, args.batch_size, table_optim, args.items)
    print(
        json.dumps(
            {
                "detail": setting,
                "dim": dim,
                "ms_per_step": round(1e3 * seconds / args.steps, 3),
                "floor_bytes_per_sample": round(floor["total"]),
                "floor_breakdown": {k: round(v) for k, v in floor.items()},
                "fraction_of_floor": round(samples_per_s / floor["floor_samples_per_s"], 4),
                "compile": args.compile,
                "tf32": args.tf32,
            }
        ),
        flush=True,
    )
    if args.record:
        append_result(line)
    model = optims = pool = None  # free GPU memory before the next setting
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--table-optims", nargs="+", default=["sparse_adam", "dense_adam"])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--min-len", type=int, default=None, help="shortest history (default: --seq-len)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pool", type=int, default=8, help="distinct synthetic batches, cycled")
    parser.add_argument("--items", type=int, default=TAOBAO_ITEMS, help="item vocabulary (smoke tests only)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward+loss (experimental)")
    parser.add_argument("--record", action="store_true", help="append the result lines to scale.jsonl")
    args = parser.parse_args()
    args.min_len = args.min_len or args.seq_len
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    for dim in args.dims:
        for table_optim in args.table_optims:
            run(dim, table_optim, args, device)


if __name__ == "__main__":
    main()
