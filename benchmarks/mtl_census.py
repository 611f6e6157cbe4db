"""Census-Income (KDD) multi-task benchmark: our towers on ``recsys=fields``, side by side with torch-rechub
and LightGBM on the same split, in one script.

    python -m benchmarks.mtl_census                                   # 5 towers x seeds 1..5
    python -m benchmarks.mtl_census --rechub-python /tmp/rechub-venv/bin/python \
        --lightgbm-python /tmp/lgbm-venv/bin/python                   # + both peers, each in its own venv
    python -m benchmarks.mtl_census --models switch mmoe --tuned logs/optuna.db   # best trial of each search
    python -m benchmarks.mtl_census --set data.source.dense_pwl=16 --backbone-name fields-pwl16   # tuned inputs
    python -m benchmarks.mtl_census --models mmoe --seeds 1 --set mtl.num_experts=4   # one tuning run
    python -m benchmarks.mtl_census --import-rechub rechub_census.jsonl   # rows of ../shared/peers/rechub_census.py
    python -m benchmarks.mtl_census --import-lightgbm lgbm_census.jsonl   # rows of ../shared/peers/lgbm_census.py
    python -m benchmarks.mtl_census --table                            # rewrite the tables in mtl.md
    python -m benchmarks.mtl_census --models none --lightgbm-python ...   # a peer alone

The peers run as subprocesses of their own interpreters (``--rechub-python``, ``--lightgbm-python``: a venv
made from the peers folder's requirements files) on the runner scripts in ``--peers``; this package never
imports them. ``--tuned <optuna.db>``: each model runs the best trial of its search ``<model>-census``
(``configs/hparams_search/<model>.yaml``, on the mean validation AUC) and its rows get ``tuned: true`` and
``trials``. Every run writes its rows into ``--out`` (a rerun of the same implementation, backbone, model,
seed and task replaces the old rows) and then rewrites the generated blocks of ``mtl.md`` (results, gap to
LightGBM, searches).

Fixed split ``split_seed2026`` (79,810 / 9,976 / 9,976 rows), tasks income > 50K and never-married; every
run stops early on the mean validation AUC (patience ``--patience``) and the best epoch is tested.
``sec_per_epoch`` = training seconds per epoch (validation excluded), one intra-op thread by default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, markdown_table, write_text_atomic
from benchmarks.mtl_common import gap_table, log, machine_load, read_rows, results_table, run_grid, upsert_rows

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
SHARED = REPO.parent / "shared"  # the team's shared folder beside the checkout (peers and data)
#: generated blocks of mtl.md: <!-- census:NAME --> ... <!-- /census:NAME -->
BLOCKS = ("results", "gap", "search", "curves")


def import_rechub(path: Path, out: Path) -> None:
    """Rows of the peer runner -> our row format (``implementation: torch-rechub``)."""
    rows = []
    for r in read_rows(path):
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
    upsert_rows(out, rows)


def import_lightgbm(path: Path, out: Path) -> None:
    """Rows of the per-task LightGBM peer runner (test AUC per task and seed) -> our row format
    (``implementation: lightgbm``). It reports no logloss and has no epochs: both are null."""
    rows = []
    for r in read_rows(path):
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
    upsert_rows(out, rows)


def run_peer(python: Path, script: Path, args: list[str], env: dict[str, str] | None = None) -> Path:
    """``<python> <script> <args>`` (a peer in its own venv); its stdout (JSON lines) -> a temp file."""
    out = Path(tempfile.mkdtemp(prefix="mtl-peer-")) / f"{script.stem}.jsonl"
    log(f"[peer {script.name}] {machine_load()}: {python} {script} {' '.join(args)}")
    start = time.perf_counter()
    with open(out, "w") as handle:
        proc = subprocess.run(
            [str(python), str(script), *args], stdout=handle, env={**os.environ, **(env or {})}, check=False
        )
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} exited with {proc.returncode} (stdout so far: {out})")
    log(f"[peer {script.name}] done in {time.perf_counter() - start:.0f} s, {machine_load()}")
    return out


def tuned_overrides(storage: str, model: str, dataset: str = "census") -> tuple[list[str], list[str], int]:
    """The best complete trial of the search ``<model>-<dataset>`` in ``storage`` (an Optuna URL or a sqlite
    file): the overrides its command line fixed, its searched values (both as Hydra overrides) and the search's
    complete trials."""
    from recsys.tracking.optuna_study import best_trial

    url = storage if "://" in storage else f"sqlite:///{Path(storage).resolve()}"
    best = best_trial(url, f"{model}-{dataset}")
    if best is None:
        raise SystemExit(f"no complete trial of the search {model}-{dataset} in {url}")
    log(f"[{model}] best of {best.finished} trials: val auc {best.value:.4f} {' '.join(best.overrides)}")
    return list(best.fixed), best.searched, best.finished


def search_table(storage: str, models: list[str], dataset: str = "census") -> str:
    """One line per search in ``storage``: searched ranges (configs/hparams_search/<model>.yaml), complete
    trials, best validation AUC, its values, and the worst/median trial (how much the search mattered); then
    a table of every complete trial."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recsys.tracking.optuna_study import best_trial, load_study

    url = storage if "://" in storage else f"sqlite:///{Path(storage).resolve()}"
    body, trials = [], []
    for model in models:
        best = best_trial(url, f"{model}-{dataset}")
        if best is None:
            continue
        study = load_study(url, f"{model}-{dataset}")
        values = [t.value for t in study.trials if t.value is not None]
        trials += [
            [
                model,
                t.number,
                f"{t.value:.4f}",
                ", ".join(f"{k.split('.')[-1]} {short(v)}" for k, v in t.params.items()),
            ]
            for t in study.trials
            if t.value is not None
        ]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"hparams_search={model}"], return_hydra_config=True)
        space = cfg.hydra.sweeper.params
        searched = sorted(study.best_trial.params)
        fixed = [k for k in space if k not in searched]
        given = dict(o.split("=", 1) for o in best.fixed)  # fixed on the sweep's command line (else the default)
        body.append(
            [
                model,
                best.finished,
                f"{best.value:.4f}",
                f"{float(np.median(values)):.4f} / {min(values):.4f}",
                "<br>".join(f"`{k}` {space[k]} → **{short(best.params[k])}**" for k in searched),
                ", ".join(f"`{k}={given.get(k, OmegaConf.select(cfg, k))}`" for k in fixed) or "–",
            ]
        )
    columns = ["search", "trials", "best val AUC", "median / worst", "searched (range → best)"]
    columns.append("fixed (command line, else default)")
    return (
        markdown_table(columns, body)
        + "\n"
        + markdown_table(["search", "trial", "val AUC", "values"], trials).rstrip("\n")
    )


def curve_table(path: Path, epochs: tuple[int, ...] = (1, 2, 3, 5, 8)) -> str:
    """Where the runs of ``--curves`` saturate, per (backbone, model) over seeds: mean validation AUC (mean of
    the tasks) at a few epochs and at the best one, the best epoch, each task's validation AUC there, and the
    epochs run (early stopping)."""
    import numpy as np

    runs: dict[tuple, dict[int, list[dict]]] = {}
    for line in read_rows(path):
        runs.setdefault((line["backbone"], line["model"]), {}).setdefault(line["seed"], []).append(line)
    body = []
    for (backbone, model), seeds in runs.items():
        curves = [sorted(points, key=lambda p: p["epoch"]) for points in seeds.values()]
        best = [max(c, key=lambda p: p["val/auc"]) for c in curves]
        at = [np.mean([c[e - 1]["val/auc"] for c in curves if len(c) >= e] or [np.nan]) for e in epochs]
        body.append(
            [
                backbone,
                model,
                len(curves),
                *(f"{v:.4f}" for v in at),
                f"{np.mean([b['val/auc'] for b in best]):.4f}",
                f"{np.mean([b['epoch'] for b in best]):.1f}",
                " / ".join(f"{np.mean([b[f'val/{t}/auc'] for b in best]):.4f}" for t in TASKS),
                f"{np.mean([len(c) for c in curves]):.1f}",
            ]
        )
    columns = ["backbone", "model", "runs", *(f"val AUC ep {e}" for e in epochs), "best val AUC", "best epoch"]
    return markdown_table([*columns, "income / marital at best", "epochs run"], body).rstrip("\n")


def short(value) -> str:
    """A searched value for a table: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_blocks(md: Path, blocks: dict[str, str]) -> None:
    """Replace ``<!-- census:NAME -->...<!-- /census:NAME -->`` in ``md`` with the generated text (a block
    the file lacks is left out)."""
    text = md.read_text()
    for name, body in blocks.items():
        start, end = f"<!-- census:{name} -->", f"<!-- /census:{name} -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    write_text_atomic(md, text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "none"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of our runs (cpu | gpu)")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run (tuning)")
    p.add_argument("--backbone-name", default=None, help="the rows' backbone label (default fields, fields-tuned)")
    p.add_argument("--tuned", default=None, metavar="OPTUNA_DB", help="run each model's best searched config")
    p.add_argument("--out", type=Path, default=RESULTS / "mtl.jsonl")
    p.add_argument("--md", type=Path, default=RESULTS / "mtl.md", help="its generated blocks are rewritten")
    p.add_argument("--curves", type=Path, default=None, help="append each run's per-epoch validation metrics")
    p.add_argument("--rechub-python", type=Path, default=None, help="run torch-rechub's runner with this python")
    p.add_argument("--rechub-max-epochs", type=int, default=None, help="cap rechub's epochs (its default: 20)")
    p.add_argument("--lightgbm-python", type=Path, default=None, help="run the LightGBM runner with this python")
    p.add_argument("--peers", type=Path, default=SHARED / "peers", help="folder of the peer runner scripts")
    p.add_argument("--census", type=Path, default=SHARED / "data/mtl/census_kdd", help="census data folder")
    p.add_argument("--search-db", default=None, help="optuna.db whose census searches the md block lists")
    p.add_argument("--import-rechub", type=Path, default=None)
    p.add_argument("--import-lightgbm", type=Path, default=None)
    p.add_argument("--table", action="store_true", help="only rewrite the markdown blocks from --out")
    args = p.parse_args(argv)
    models = [m for m in args.models if m != "none"]
    if args.import_rechub is not None:
        import_rechub(args.import_rechub, args.out)
    if args.import_lightgbm is not None:
        import_lightgbm(args.import_lightgbm, args.out)
    imported = args.import_rechub is not None or args.import_lightgbm is not None
    if not args.table and not imported:
        if models and args.tuned is None:
            run_grid(
                {m: MODELS[m] for m in models},
                COMMON,
                args.set,
                args.seeds,
                TASKS,
                args.backbone_name or "fields",
                "census",
                args.out,
                args.threads,
                args.max_epochs,
                args.patience,
                curves=args.curves,
                accelerator=args.accelerator,
            )
        for model in models if args.tuned is not None else []:
            fixed, searched, trials = tuned_overrides(args.tuned, model)
            run_grid(  # the search's fixed values first: this benchmark's own settings, then the trial's, win
                {model: [*MODELS[model], *searched]},
                [*fixed, *COMMON],
                args.set,
                args.seeds,
                TASKS,
                args.backbone_name or "fields-tuned",
                "census",
                args.out,
                args.threads,
                args.max_epochs,
                args.patience,
                tuned={model: trials},
                curves=args.curves,
                accelerator=args.accelerator,
            )
        if args.rechub_python is not None:
            peer_args = ["--threads", str(args.threads), "--seeds", *map(str, args.seeds)]
            peer_args += ["--data", str(args.census / "census-income.test.gz")]
            if args.rechub_max_epochs is not None:
                peer_args += ["--max-epochs", str(args.rechub_max_epochs)]
            side = Path(tempfile.mkdtemp(prefix="mtl-rechub-")) / "rechub_census.jsonl"  # its own copy + history
            peer_args += ["--split-dir", str(args.census / "split_seed2026"), "--out", str(side)]
            import_rechub(run_peer(args.rechub_python, args.peers / "rechub_census.py", peer_args), args.out)
        if args.lightgbm_python is not None:  # seeds 1..5, as the runner fixes them
            env = {"OMP_WAIT_POLICY": "PASSIVE"}  # spinning OpenMP threads stall a shared machine
            path = run_peer(args.lightgbm_python, args.peers / "lgbm_census.py", [str(args.census)], env)
            import_lightgbm(path, args.out)
    rows = read_rows(args.out)
    blocks = {"results": results_table(rows, "census"), "gap": gap_table(rows, "census")}
    if args.search_db:
        blocks["search"] = search_table(args.search_db, list(MODELS))
    if args.curves is not None and args.curves.exists():
        blocks["curves"] = curve_table(args.curves)
    print(blocks["results"])
    if args.md.exists():
        write_blocks(args.md, blocks)


if __name__ == "__main__":
    main()
