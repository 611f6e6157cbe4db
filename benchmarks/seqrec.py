"""Sequential recommendation, ours vs RecBole under both ranking protocols: SASRec, MQSA (λ_kd = 0), MQSA-TED and
MQSA-TED + MoH through the real command, RecBole 1.2.1's SASRec through its peer runner, on the S3-Rec files
(Beauty, Sports_and_Outdoors, Yelp), on one machine.

    python -m benchmarks.seqrec --models sasrec mqsa_ted --datasets beauty --seeds 0 --max-epochs 5
    python -m benchmarks.seqrec --trainer gpu --models sasrec mqsa_ted recbole_sasrec --seeds 0 \\
        --recbole-dir <folder of recbole_masked.py> --recbole-pythonpath <RecBole wheels installed with --target>
    python -m benchmarks.seqrec --table-only          # rebuild seqrec.md from seqrec.jsonl

Protocols (``--protocols``, both by default): ``history_removed`` (every item of the user's history removed from
the full ranking: the official MQSA-TED / S3-Rec protocol, ``eval.exclude_history=true``) and ``history_kept``
(RecBole's: history items stay rankable). Each JSON line is one (implementation, model, dataset, seed, protocol).

**Ours**: one ``python -m pipelines.train recsys=<model> data=<dataset> ...`` subprocess per (model, dataset, seed)
(Lightning, MLflow, checkpoints on, as a user runs it) with ``data.test_each_epoch=true``. With both protocols it
is one training run: ``eval.both_protocols=true`` ranks validation and test under both protocols after every epoch
(the other protocol as ``val_history_kept/*``, ``epoch_test_history_kept/*``) and early stopping is
``EarlyStoppingAll`` on both protocols' validation NDCG@20, so training (which no protocol touches) runs until
both have gone ``--patience`` epochs without a gain. Each protocol's row is then selected by *its own*
validation NDCG@20: the run's protocol (history_removed) from ``pipelines.train``'s checkpoint test
(``metrics.json``), the other from its per-epoch test metrics at its best validation epoch (``test_from``:
``checkpoint`` | ``epoch_test``); both are what a run under that protocol alone would report.

**RecBole** (``--models recbole_sasrec``): ``recbole_masked.py`` (RecBole's own SASRec, trainer, early stopping on
validation NDCG@10 with RecBole's protocol, patience ``--recbole-patience``) run by ``benchmarks/peer_launch.py``
in its own ``PYTHONPATH`` (RecBole is never imported by the package); one run gives two rows: RecBole's ``test``
(history_kept) and ``test_history_removed`` (the same checkpoint re-ranked with the history removed).

Timing: ``epoch_times`` (ours: training + validation + per-epoch test ranking, ``time/epoch_seconds``; RecBole:
training only), ``seconds_to_recbole_best``: cumulative epoch time until the test NDCG@10 first reached RecBole
SASRec's test NDCG@10 *under the same protocol* (RecBole's own row: its training seconds up to its best epoch;
the reference is the newest RecBole row of the same dataset and protocol in ``--out``, else, for history_kept only,
the peers README numbers in ``RECBOLE_BEST``). ``--deadline-s`` bounds the whole call: no run starts after it,
ours get ``trainer.max_time`` so they stop and test before it, RecBole a ``--time-budget-s``; a cut run still
gives rows (selection over the epochs it ran, ``stopped_by: time_limit``).

Appends one JSON line per row to ``benchmarks/results/seqrec.jsonl`` and rebuilds ``seqrec.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
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
PROTOCOLS = ("history_removed", "history_kept")
# RecBole SASRec's best test NDCG@10 (its own protocol: history kept) and its training seconds to reach it, on the
# same files and an H200 (peers README, batch 256); used only where no measured RecBole row is in --out
RECBOLE_BEST = {"beauty": (0.0414, 93.0), "sports": (0.0221, 126.0), "yelp": (0.0384, 153.0)}
MODELS: dict[str, list[str]] = {  # overrides on top of the configs' defaults (configs/recsys/*.yaml)
    "sasrec": ["recsys=sasrec"],
    "mqsa": ["recsys=mqsa_ted", "recsys.lambda_kd=0.0"],
    "mqsa_ted": ["recsys=mqsa_ted"],
    "mqsa_ted_moh": ["recsys=mqsa_ted", "recsys.attention=moh"],
}
RECBOLE = "recbole_sasrec"
METRICS = ("hr5", "hr10", "hr20", "ndcg5", "ndcg10", "ndcg20")
TEST_MARGIN_S = 60.0  # ours: seconds kept for start-up (max_time counts from fit start), test, bundle, MLflow


def seconds_to_reach(values: Sequence[float], epoch_seconds: Sequence[float], level: float) -> float | None:
    """Cumulative seconds of the epochs up to the first whose value is ``>= level`` (None if none is)."""
    total = 0.0
    for value, seconds in zip(values, epoch_seconds):
        total += seconds
        if value >= level:
            return round(total, 2)
    return None


def metric_key(name: str) -> str:
    """``hr10`` -> ``hr@10`` (Lightning's names in metrics.json) ."""
    return re.sub(r"(\d+)$", r"@\1", name)


def recbole_reference(rows: Sequence[dict[str, Any]], dataset: str, protocol: str) -> dict[str, Any] | None:
    """RecBole SASRec's test NDCG@10 and training seconds to its best epoch for (dataset, protocol): the newest
    measured RecBole row, else (history_kept only) the peers README numbers; None if neither."""
    for row in reversed(rows):
        if row.get("implementation") == "recbole" and row["dataset"] == dataset and row.get("protocol") == protocol:
            return {"ndcg10": row["ndcg10"], "seconds": row["seconds_to_recbole_best"], "source": "measured"}
    if protocol == "history_kept" and dataset in RECBOLE_BEST:
        level, seconds = RECBOLE_BEST[dataset]
        return {"ndcg10": level, "seconds": seconds, "source": "peers README"}
    return None


def fill_recbole_reference(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sets ``seconds_to_recbole_best`` / ``recbole_reference`` of one of our rows from ``rows``."""
    if row.get("implementation") != "ours" or "test_ndcg10" not in row:
        return row
    ref = recbole_reference(rows, row["dataset"], row["protocol"])
    row["recbole_reference"] = ref
    row["seconds_to_recbole_best"] = (
        seconds_to_reach(row["test_ndcg10"], row["epoch_times"], ref["ndcg10"]) if ref else None
    )
    if "train_times" in row:  # the training alone, as RecBole's seconds count
        row["train_seconds_to_recbole_best"] = (
            seconds_to_reach(row["test_ndcg10"], row["train_times"], ref["ndcg10"]) if ref else None
        )
    return row


def remaining(args: argparse.Namespace) -> float:
    return float("inf") if args.deadline_s is None else args.start + args.deadline_s - time.time()


# ---- ours ---------------------------------------------------------------------------------------------------
def our_overrides(model: str, dataset: str, path: Path, seed: int, args: argparse.Namespace) -> list[str]:
    name = dataset if dataset in DATASETS else path.stem.lower()
    data = [f"data={dataset}"] if dataset in DATASETS else ["data=seqrec", f"data.name={name}"]
    main, others = args.protocols[0], args.protocols[1:]
    overrides = [
        *MODELS[model],
        *data,
        f"data.path={path}",
        "data.test_each_epoch=true",
        f"seed={seed}",
        f"trainer.max_epochs={args.max_epochs}",
        f"callbacks.early_stopping.patience={args.patience}",
        f"eval.exclude_history={str(main == 'history_removed').lower()}",
        f"trainer={args.trainer}",
        "trainer.enable_progress_bar=false",
    ]
    if others:  # one run, both protocols; stop once both protocols' validation stalled
        overrides += [
            "eval.both_protocols=true",
            "callbacks.early_stopping._target_=recsys.tracking.callbacks.EarlyStoppingAll",
            f"+callbacks.early_stopping.also=[val_{others[0]}/ndcg@20]",
        ]
    return overrides


def mlflow_run_id(tracking_uri: str) -> str | None:
    """The one run in a run's own MLflow store (a run cut before metrics.json has no other record of it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_ours(model: str, dataset: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    path = args.data_dir / DATASETS[dataset] if dataset in DATASETS else Path(dataset)
    name = dataset if dataset in DATASETS else path.stem.lower()
    run_dir = args.work / f"{model}-{name}-seed{seed}-{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"  # one store per run: concurrent benchmarks never share one
    overrides = our_overrides(model, dataset, path, seed, args)
    overrides.append(f"logger.artifact_location={run_dir / 'mlartifacts'}")
    tuned = tuned_overrides(model, name, args)
    if args.tuned_from and tuned is None:
        log(f"[ours {model} {name}] no complete trial of study {model}-{name} in {args.tuned_from}: not run")
        return []
    if tuned is not None:  # the search config (its fixed links, e.g. one lr for both optimisers) + the best trial
        overrides = [*tuned["fixed"], *(o for o in overrides if not o.startswith("recsys=")), *tuned["overrides"]]
    timeout = 24 * 3600.0
    if args.deadline_s is not None:  # stop training in time to test the best checkpoint before the deadline
        budget = int(remaining(args) - TEST_MARGIN_S)
        hours, rest = divmod(max(budget, 1), 3600)
        overrides.append(f"+trainer.max_time='00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}'")  # DD:HH:MM:SS
        timeout = remaining(args)
    log(f"[ours {model} {name} seed {seed}] {machine_load()}")
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    run, metrics = train([*overrides, *args.extra], run_dir, env, timeout, raise_on_timeout=False)
    run_id = metrics.get("run_id") or mlflow_run_id(tracking_uri)
    if run_id is None or not (run.ok or run.timed_out or run.returncode == 143):
        raise RuntimeError(f"{run.command} failed (exit {run.returncode}):\n{run.stderr_tail}")
    curves = {}  # protocol -> (MLflow metric suffix, history)
    for i, protocol in enumerate(args.protocols):
        sfx = "" if i == 0 else f"_{protocol}"
        names = [f"val{sfx}/ndcg20", *(f"epoch_test{sfx}/{m}" for m in METRICS), "time/epoch_seconds"]
        names.append("time/train_seconds")
        curves[protocol] = (sfx, metric_history(tracking_uri, run_id, names))
    epochs = min(len(history[f"val{sfx}/ndcg20"]) for sfx, history in curves.values())
    if not epochs:
        log(f"[ours {model} {name}] no finished epoch: no row")
        return []
    best = {p: max(range(epochs), key=h[f"val{sfx}/ndcg20"].__getitem__) for p, (sfx, h) in curves.items()}
    converged = {p: epochs - (b + 1) >= args.patience or epochs >= args.max_epochs for p, b in best.items()}
    if run.timed_out or not run.ok:
        stop = "killed"
    elif epochs >= args.max_epochs:
        stop = "max_epochs"
    else:  # early stopping needs every protocol's patience used up; else trainer.max_time ended it
        stop = "early_stopping" if all(converged.values()) else "time_limit"
    rows = []
    for i, (protocol, (sfx, history)) in enumerate(curves.items()):
        b = best[protocol]  # the first best epoch, as ModelCheckpoint keeps it
        from_checkpoint = i == 0 and run.ok and f"test/{metric_key('ndcg10')}" in metrics
        test = {
            m: metrics[f"test/{metric_key(m)}"] if from_checkpoint else history[f"epoch_test{sfx}/{m}"][b]
            for m in METRICS
        }
        times = [round(s, 3) for s in history["time/epoch_seconds"]][:epochs]
        train_times = [round(s, 3) for s in history.get("time/train_seconds", [])][:epochs]
        rows.append(
            {
                "model": model,
                "dataset": name,
                "seed": seed,
                **{m: round(v, 6) for m, v in test.items()},
                "best_epoch": b + 1,
                "epochs_run": epochs,
                "converged": converged[protocol],
                "stopped_by": stop,
                "sec_per_epoch": round(sum(times) / len(times), 3) if times else None,
                "device": "cuda" if args.trainer == "gpu" else "cpu",
                "entry": "pipelines.train",
                "implementation": "ours",
                "protocol": protocol,
                "selection": f"val ndcg@20 ({protocol}), patience {args.patience}",
                "protocols_in_run": list(args.protocols),  # >1: trained until every one's validation stalled
                "overrides": list(args.extra),  # Hydra overrides beyond the benchmark's own (e.g. a schedule)
                "test_from": "checkpoint" if from_checkpoint else "epoch_test",
                "epoch_times": times,
                **({"train_times": train_times} if len(train_times) == epochs else {}),
                "val_ndcg20": [round(v, 6) for v in history[f"val{sfx}/ndcg20"]][:epochs],
                "test_ndcg10": [round(v, 6) for v in history[f"epoch_test{sfx}/ndcg10"]][:epochs],
                **({"tuned": True, **{k: v for k, v in tuned.items() if k != "overrides"}} if tuned else {}),
                "command": run.command,
                "machine_load": machine_load(),
            }
        )
    return rows


def tuned_overrides(model: str, dataset: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """With ``--tuned-from``: the best complete trial of the Optuna study ``<model>-<dataset>`` (the name
    configs/hparams_search/<model>.yaml gives it) as overrides on top of ``hparams_search=<model>``, with the trial
    count and the trial's validation value (the study never read the test split)."""
    if not args.tuned_from:
        return None
    from recsys.tracking.optuna_study import best_trial

    best = best_trial(args.tuned_from, f"{model}-{dataset}")
    if best is None:
        return None
    return {
        "fixed": list(best.fixed),  # what the search's command line fixed: before this benchmark's own settings
        "overrides": [f"hparams_search={model}", *best.searched],
        "trials": best.finished,
        "tuned_params": best.params,
        "tuned_trial": best.number,
        "tuned_val_objective": round(best.value, 6),
    }


# ---- RecBole ------------------------------------------------------------------------------------------------
def run_recbole(dataset: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.recbole_dir is None:
        raise SystemExit("--models recbole_sasrec needs --recbole-dir (the folder of recbole_masked.py)")
    path = args.data_dir / DATASETS[dataset] if dataset in DATASETS else Path(dataset)
    name = dataset if dataset in DATASETS else path.stem.lower()
    out = args.work / f"recbole-{name}-seed{seed}-{int(time.time())}.json"
    budget = args.recbole_budget_s
    timeout = 24 * 3600.0
    if args.deadline_s is not None:  # RecBole checks its budget between epochs; keep room for data prep and tests
        budget = min(budget, remaining(args) - args.recbole_margin_s)
        timeout = remaining(args)
        if budget < 30:
            log(f"[recbole {name}] {remaining(args):.0f} s left: not started")
            return []
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "peer_launch.py"),
        str(Path(args.recbole_dir) / "recbole_masked.py"),
        *["--data", str(path), "--dataset", name, "--seed", str(seed), "--max-epochs", str(args.max_epochs)],
        *["--time-budget-s", str(int(budget)), "--patience", str(args.recbole_patience)],
        *["--batch-size", str(args.recbole_batch_size), "--quiet", "--out", str(out)],
        *(["--threads", str(args.recbole_threads)] if args.recbole_threads else []),
        *(["--cpu"] if args.trainer != "gpu" else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in args.recbole_pythonpath)}
    log(f"[recbole sasrec {name} seed {seed}] {machine_load()}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log(f"[recbole {name}] killed at the deadline after {time.perf_counter() - start:.0f} s: no result")
        return []
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    stand_ins = re.search(r"peer_launch stand-ins: (\[.*\])", proc.stderr)
    times = result["sec_per_epoch_all"]
    best = result["best_epoch"]
    rows = []
    for protocol, key in (("history_kept", "test"), ("history_removed", "test_history_removed")):
        if protocol not in args.protocols:
            continue
        test = {k.lower().replace("@", ""): v for k, v in result[key].items()}
        rows.append(
            {
                "model": "sasrec",
                "dataset": name,
                "seed": seed,
                **{m: test[m] for m in METRICS},
                "best_epoch": best,
                "epochs_run": result["epochs_run"],
                "converged": result["stopped_by"] == "early_stopping",
                "stopped_by": result["stopped_by"],
                "sec_per_epoch": result["sec_per_epoch_median"],
                "device": "cuda" if args.trainer == "gpu" else "cpu",
                "entry": "recbole_masked.py (RecBole 1.2.1)",
                "implementation": "recbole",
                "protocol": protocol,
                "selection": f"valid ndcg@10 (history_kept), patience {args.recbole_patience}",
                "test_from": "checkpoint" if key == "test" else "checkpoint re-ranked with the history removed",
                "epoch_times": times,
                "val_ndcg10": result["valid_ndcg10_per_epoch"],
                "seconds_to_recbole_best": round(sum(times[:best]), 2),
                "data_prep_seconds": result["data_prep_seconds"],
                "total_wall_seconds": result["total_wall_seconds"],
                "hparams": result["hparams"],
                "env": result["env"],
                "stand_ins": json.loads(stand_ins.group(1).replace("'", '"')) if stand_ins else None,
                "command": " ".join(["python", *command[1:]]),
                "machine_load": machine_load(),
            }
        )
    return rows


# ---- table --------------------------------------------------------------------------------------------------
def _group_key(row: dict[str, Any]) -> tuple:
    impl = row.get("implementation", "ours")
    selection = row.get("selection", "val ndcg@20, patience 20")
    if impl == "ours":  # ours select under the row's own protocol: the rule without the protocol's name
        selection = re.sub(r" \((history_removed|history_kept)\)", "", selection)
    if row.get("overrides"):  # a schedule or setting other than the config's: its own row
        selection += "; " + " ".join(row["overrides"])
    if row.get("tuned"):  # the best trial of a search: not averaged with the config's own settings
        trials = row.get("trials", "?")
        selection += f"; tuned, best of {trials} trial{'' if trials == 1 else 's'}"
    return (row["dataset"], impl != "ours", row["model"], row["device"], row.get("entry", "plain loop"), selection)


def _impl(is_peer: bool) -> str:
    return "RecBole" if is_peer else "ours"


def write_table(rows: Sequence[dict[str, Any]], table: Path) -> None:
    """A side-by-side table (per dataset: ours and RecBole, each protocol's test NDCG@10 / HR@10 / NDCG@5 next to
    each other) and the full table (every metric, per dataset and protocol); mean ± std over seeds."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[_group_key(row)][row.get("protocol", "history_removed")].append(row)

    def cell(group: list[dict[str, Any]], metric: str) -> str:
        return mean_std([r[metric] for r in group]) if group else "–"

    def reached(group: list[dict[str, Any]], field: str = "seconds_to_recbole_best") -> str:
        # rows of ours written before `recbole_reference` existed measured against RecBole's history-kept level
        # whatever their own protocol: not shown
        same_protocol = [r for r in group if r.get("implementation") == "recbole" or "recbole_reference" in r]
        if field != "seconds_to_recbole_best":  # RecBole's own seconds are training only already
            same_protocol = [{**r, field: r.get(field, r.get("seconds_to_recbole_best"))} for r in same_protocol]
            same_protocol = [r for r in same_protocol if r.get("implementation") == "recbole" or "train_times" in r]
        values = [r[field] for r in same_protocol if r.get(field) is not None]
        return f"{min(values):.1f}" if values else "–"

    side, full = [], []
    for (dataset, is_peer, model, device, entry, selection), by_protocol in sorted(groups.items()):
        removed, kept = by_protocol.get("history_removed", []), by_protocol.get("history_kept", [])
        side.append(
            [dataset, _impl(is_peer), model, device, entry, selection, max(len(removed), len(kept))]
            + [cell(g, m) for m in ("ndcg10", "hr10", "ndcg5") for g in (removed, kept)]
            + [reached(removed), reached(kept)]
        )
        for protocol, group in sorted(by_protocol.items()):
            stopped = sorted({str(r.get("stopped_by", "–")) for r in group})
            full.append(
                [dataset, protocol, _impl(is_peer), model, device, entry, selection, len(group)]
                + [cell(group, m) for m in METRICS]
                + [
                    mean_std([r["best_epoch"] for r in group if r.get("best_epoch") is not None], 1),
                    ", ".join(stopped),
                    f"{min(r['sec_per_epoch'] for r in group):.2f}"
                    if all(r.get("sec_per_epoch") for r in group)
                    else "–",
                    reached(group),
                    reached(group, "train_seconds_to_recbole_best"),
                ]
            )
    side_columns = ["dataset", "impl.", "model", "device", "entry", "selection", "seeds"]
    side_columns += [f"{m} {p}" for m in ("NDCG@10", "HR@10", "NDCG@5") for p in ("removed", "kept")]
    side_columns += ["s to RecBole best, removed", "s to RecBole best, kept"]
    columns = ["dataset", "protocol", "impl.", "model", "device", "entry", "selection", "seeds", *METRICS]
    columns += ["best epoch", "stopped by", "s/epoch", "s to RecBole best", "training s to RecBole best"]
    text = (
        "# Sequential recommendation: ours vs RecBole under both protocols (`python -m benchmarks.seqrec`)\n\n"
        "Full-ranking test metrics, mean ± std over seeds. **Protocols**: `removed` (`history_removed`) = every "
        "item of the user's history removed from the ranking (the official MQSA-TED / S3-Rec protocol, "
        "`eval.exclude_history=true`); `kept` (`history_kept`) = history items stay rankable (RecBole's). Compare "
        "numbers of one protocol only.\n\n"
        "**Selection rules.** Ours (`pipelines.train`): for each protocol, the epoch of best validation NDCG@20 "
        "*under that protocol*, early stopping after `patience` epochs without a gain; one training run gives both "
        "protocols (`eval.both_protocols`, training until both protocols' validation stalled, so each protocol "
        "gets the epoch a run under it alone would select; `protocols_in_run` in the JSON line). RecBole: its own "
        "early stopping and checkpoint on validation NDCG@10 with history kept (patience 5); its `removed` numbers "
        "are that same checkpoint re-ranked with the history removed (`recbole_masked.py`): RecBole never selects "
        "under the removed protocol. Rows with entry `plain loop` come from the deleted plain-loop harness "
        "(history removed only).\n\n"
        "## Side by side\n\n" + markdown_table(side_columns, side) + "\n## Every metric\n\n"
        "`stopped by`: early_stopping | max_epochs | killed (cut at the call's deadline) | time_limit (RecBole's "
        "budget or our `trainer.max_time`; both: selection over the epochs run, `converged` false in the JSON "
        "line). `s/epoch`: ours = training + validation + per-epoch test ranking (under both protocols when both "
        "are run), fastest seed; RecBole = training only (median). `s to RecBole best` = cumulative epoch time "
        "until test NDCG@10 first reached RecBole SASRec's test NDCG@10 under the same protocol (for RecBole: its "
        "training seconds to its best epoch; older rows of ours, which compared across protocols, show –); "
        "`training s to RecBole best`: the same over our training time alone (`time/train_seconds`: validation "
        "and the per-epoch test ranking left out), which is what RecBole's seconds count (rows from before it was "
        "logged show –).\n\n" + markdown_table(columns, full)
    )
    write_text_atomic(table, text + kept_notes(table))


def kept_notes(table: Path) -> str:
    """The hand-written part of an existing table file: from its first ``## `` heading that this module does not
    write (notes on the runs, added below the tables), to the end."""
    if not table.exists():
        return ""
    lines = table.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("## ") and not line.startswith(("## Side by side", "## Every metric")):
            return "\n" + "".join(lines[i:])
    return ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, RECBOLE])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), help="beauty | sports | yelp | a file path")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "seqrec")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=20, help="ours: epochs without a validation NDCG@20 gain")
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=PROTOCOLS,
        default=list(PROTOCOLS),
        help="history_removed: the official MQSA-TED / S3-Rec ranking; history_kept: RecBole's (eval.exclude_history); "
        "ours trains once and selects each protocol by its own validation NDCG@20 (the first one is the run's)",
    )
    parser.add_argument("--trainer", default="default", help="configs/trainer option (gpu for one GPU)")
    parser.add_argument("--deadline-s", type=float, default=None, help="seconds from now by which every run ends")
    parser.add_argument("--recbole-dir", type=Path, default=REPO.parent / "shared" / "peers")
    parser.add_argument(
        "--recbole-pythonpath", nargs="+", default=[], help="folders with RecBole 1.2.1 and its small dependencies"
    )
    parser.add_argument("--recbole-patience", type=int, default=5, help="RecBole's stopping_step")
    parser.add_argument("--recbole-budget-s", type=float, default=300.0, help="RecBole's training+validation budget")
    parser.add_argument("--recbole-margin-s", type=float, default=100.0, help="deadline room for prep and tests")
    parser.add_argument("--recbole-batch-size", type=int, default=256)
    parser.add_argument("--recbole-threads", type=int, default=None)
    parser.add_argument(
        "--tuned-from",
        default=None,
        help="Optuna storage URL (sqlite:///.../optuna.db): ours run with the best trial of study <model>-<dataset> "
        "(python -m pipelines.train -m hparams_search=<model> data=<dataset> ...); rows gain tuned, trials",
    )
    parser.add_argument("--work", type=Path, default=REPO / "logs" / "benchmarks" / "seqrec")
    parser.add_argument("--out", type=Path, default=RESULTS / "seqrec.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "seqrec.md")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing: fill our rows' seconds_to_recbole_best from the RecBole rows in --out "
        "(rows written before a RecBole row of their dataset and protocol existed) and rebuild --table",
    )
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every run of ours")
    args = parser.parse_args(argv)
    args.start = time.time()
    return args


def finalize(path: Path, table: Path) -> None:
    rows = read_jsonl(path)
    # rows of this benchmark whose reference was not a measured RecBole row when they were written (rows from before
    # the field existed keep what they recorded)
    updated = [
        fill_recbole_reference(r, rows)
        if "recbole_reference" in r and (r["recbole_reference"] or {}).get("source") != "measured"
        else r
        for r in rows
    ]
    if updated != read_jsonl(path):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in updated))
    write_table(updated, table)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.table_only:
        finalize(args.out, args.table)
        return []
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    out_rows, failures = [], []
    for dataset in args.datasets:
        for model in args.models:
            for seed in args.seeds:
                if remaining(args) < TEST_MARGIN_S + 30:
                    log(f"[{model} {dataset} seed {seed}] not started: {remaining(args):.0f} s to the deadline")
                    continue
                try:
                    if model == RECBOLE:
                        rows = run_recbole(dataset, seed, args)
                    else:
                        rows = run_ours(model, dataset, seed, args)
                except RuntimeError as error:  # record the others; report the failure at the end
                    log(str(error))
                    failures.append(f"{model} {dataset} seed {seed}")
                    continue
                known = read_jsonl(args.out)
                rows = [fill_recbole_reference(r, [*known, *rows]) for r in rows]
                append_jsonl(args.out, rows)
                out_rows += rows
                write_table(read_jsonl(args.out), args.table)
    if failures:
        raise SystemExit(f"failed: {'; '.join(failures)}")
    return out_rows


if __name__ == "__main__":
    main()
