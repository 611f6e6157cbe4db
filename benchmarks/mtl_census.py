"""Census-Income (KDD) multi-task benchmark: our towers on ``recsys=fields``, side by side with torch-rechub.

    python -m benchmarks.mtl_census                                   # 5 towers x seeds 1..5
    python -m benchmarks.mtl_census --set data.source.dense_pwl=16 --backbone-name fields-pwl16   # tuned inputs
    python -m benchmarks.mtl_census --models mmoe --seeds 1 --set mtl.num_experts=4   # one tuning run
    python -m benchmarks.mtl_census --import-rechub rechub_census.jsonl   # rows of ../shared/peers/rechub_census.py
    python -m benchmarks.mtl_census --import-lightgbm lgbm_census.jsonl   # rows of ../shared/peers/lgbm_census.py
    python -m benchmarks.mtl_census --table                            # rewrite benchmarks/results/mtl.md

Fixed split ``split_seed2026`` (79,810 / 9,976 / 9,976 rows), tasks income > 50K and never-married; every
run stops early on the mean validation AUC (patience ``--patience``) and the best epoch is tested.
``sec_per_epoch`` = training seconds per epoch (validation excluded), one intra-op thread by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.mtl_common import append_rows, read_rows, results_table, run_grid

TASKS = ("income", "marital")
#: Tuned settings per tower (on the validation AUC of seed 1; see docs/mtl.md).
COMMON = [
    "recsys=fields",
    "data=census",
    "objective.dense_optimizer.lr=0.001",
    "objective.sparse_optimizer.lr=0.001",
    "data.batch_size=256",
]
MODELS = {
    "shared_bottom": ["mtl=shared_bottom"],
    "mmoe": ["mtl=mmoe"],
    "ple": ["mtl=ple"],
    "switch": ["mtl=switch"],
    "taskexpert": ["mtl=taskexpert"],
}
RECHUB_NAMES = {"SharedBottom": "shared_bottom", "MMOE": "mmoe", "PLE": "ple"}


def import_rechub(path: Path, out: Path) -> None:
    """Rows of the peer runner -> our row format (``implementation: torch-rechub``)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows.append(
            {
                "model": RECHUB_NAMES[r["model"]],
                "backbone": "rechub-emb4",
                "dataset": "census",
                "seed": r["seed"],
                "task": r["task"],
                "auc": r["auc"],
                "logloss": r["logloss"],
                "sec_per_epoch": r["sec_per_epoch"],
                "implementation": "torch-rechub",
            }
        )
    append_rows(out, rows)


def import_lightgbm(path: Path, out: Path) -> None:
    """Rows of the per-task LightGBM peer runner (test AUC per task and seed) -> our row format
    (``implementation: lightgbm``). It reports no logloss and has no epochs: both are null."""
    rows = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows.append(
            {
                "model": "lightgbm",
                "backbone": "gbdt-per-task",
                "dataset": r["dataset"],
                "seed": r["seed"],
                "task": r["task"],
                "auc": r["auc"],
                "logloss": None,
                "sec_per_epoch": None,
                "implementation": "lightgbm",
            }
        )
    append_rows(out, rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run (tuning)")
    p.add_argument("--backbone-name", default="fields", help="the rows' backbone label (name a --set variant)")
    p.add_argument("--out", type=Path, default=RESULTS / "mtl.jsonl")
    p.add_argument("--import-rechub", type=Path, default=None)
    p.add_argument("--import-lightgbm", type=Path, default=None)
    p.add_argument("--table", action="store_true", help="only rewrite the markdown table from --out")
    args = p.parse_args(argv)
    if args.import_rechub is not None:
        import_rechub(args.import_rechub, args.out)
        return
    if args.import_lightgbm is not None:
        import_lightgbm(args.import_lightgbm, args.out)
        return
    if not args.table:
        run_grid(
            {m: MODELS[m] for m in args.models},
            COMMON,
            args.set,
            args.seeds,
            TASKS,
            args.backbone_name,
            "census",
            args.out,
            args.threads,
            args.max_epochs,
            args.patience,
        )
    table = results_table(read_rows(args.out), "census")
    print(table)


if __name__ == "__main__":
    main()
