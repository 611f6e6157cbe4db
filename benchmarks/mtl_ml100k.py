"""MovieLens-100k multi-task benchmark: DARE × {single, mmoe, ple, switch, taskexpert}, tasks click and like.

    python -m benchmarks.mtl_ml100k                      # 5 towers, seed 1
    python -m benchmarks.mtl_ml100k --models switch --seeds 1 2 3

``data=ml100k_mtl``: every rating after the first 5 is a positive with 2 sampled negatives; click = rated,
like = rating >= 4 (entire space). Early stopping on the mean validation AUC of the two tasks; the best
epoch is tested. Rows go to ``benchmarks/results/mtl.jsonl`` (dataset ``ml100k_mtl``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.mtl_common import (RESULTS, append_rows, log, machine_load, markdown_table, read_rows,
                                   result_rows, train_and_test)

TASKS = ("click", "like")
COMMON = ["recsys=dare", "data=ml100k_mtl", "data.batch_size=1024"]
MODELS = {name: [f"mtl={name}"] for name in ("single", "mmoe", "ple", "switch", "taskexpert")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--out", type=Path, default=RESULTS / "mtl.jsonl")
    p.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    args = p.parse_args(argv)
    if not args.table:
        import torch

        torch.set_num_threads(args.threads)
        for model in args.models:
            for seed in args.seeds:
                run = train_and_test([*COMMON, *MODELS[model], *args.set], seed, args.max_epochs, args.patience)
                log(f"[{model} seed={seed}] {machine_load()} epochs {run['epochs']} best {run['best_epoch']} "
                    f"val auc {run['best_val_auc']:.4f} test " + " ".join(
                        f"{t} {run['test'][f'test/{t}/auc']:.4f}" for t in TASKS) + f" {run['sec_per_epoch']:.1f}s/epoch")
                append_rows(args.out, result_rows(model, "dare", "ml100k_mtl", seed, TASKS, run))
    print(markdown_table(read_rows(args.out), "ml100k_mtl"))


if __name__ == "__main__":
    main()
