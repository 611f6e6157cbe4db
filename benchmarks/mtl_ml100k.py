"""MovieLens-100k multi-task benchmark: DARE × {single, mmoe, ple, switch, taskexpert}, tasks click and like.

    python -m benchmarks.mtl_ml100k                      # 5 towers, seed 1
    python -m benchmarks.mtl_ml100k --models switch --seeds 1 2 3

Every run goes through the same Hydra config, ``pipelines.train.build`` and LightningModule as a training run.

``data=ml100k_mtl``: every rating after the first 5 is a positive with 2 sampled negatives; click = rated,
like = rating >= 4 (entire space). Early stopping on the mean validation AUC of the two tasks; the best
epoch is tested. Rows go to ``benchmarks/results/mtl.jsonl`` (dataset ``ml100k_mtl``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.mtl_common import read_rows, results_table, run_grid

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
        run_grid(
            {m: MODELS[m] for m in args.models},
            COMMON,
            args.set,
            args.seeds,
            TASKS,
            "dare",
            "ml100k_mtl",
            args.out,
            args.threads,
            args.max_epochs,
            args.patience,
        )
    print(results_table(read_rows(args.out), "ml100k_mtl"))


if __name__ == "__main__":
    main()
