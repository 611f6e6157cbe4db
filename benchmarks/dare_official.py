"""The authors' DARE code (thuml/DARE @ c72e087, ``train_pytorch.py``) on the package's own ml-100k split.

    .venv/bin/python -m benchmarks.dare_official --peers <folder of convert_ml100k.py / run_official.py>
        [--official <code folder>] [--official-git <git dir of a thuml/DARE clone>] [--models DARE twin DIN]
        [--seeds 1 2 3] [--epochs 2] [--test-interval 23] [--run-timeout S] [--deadline S] [--work <folder>]
        [--results benchmarks/results] [--tag dare_official] [--prepare-only | --report-only]
        [pipelines.prepare overrides ...]

What it does, in order (nothing of the official code or of the peer scripts enters the package):

1. **Official code** in ``--official`` (default ``<work>/code-c72e087``, git-ignored): used as it is when it holds
   ``train_pytorch.py`` (its ``COMMIT`` file, when present, must name c72e087); otherwise exported there from
   ``--official-git`` (``git archive c72e087``) or from a fresh clone of github.com/thuml/DARE. Only the
   training code is exported (``train_pytorch.py dataset.py utils.py model tools scripts README.md``, ~150 KB).
2. **The package's split**: ``python -m pipelines.prepare data=ml100k <overrides>`` prepares (or finds) the cached
   split that ``pipelines.train data=ml100k`` reads; its folder is parsed from the entry point's output.
3. **Conversion** with the peer converter (``<peers>/convert_ml100k.py convert``) into
   ``<work>/data/<name>-<fingerprint>`` (skipped when its ``conversion.json`` names the same fingerprint); the
   vocabulary flags come from its report.
4. **Training**: for each seed, DARE, TWIN and DIN **one after another** (never two at once: processes sharing one
   GPU made each step ~10x slower), each one process of ``<peers>/run_official.py`` (the official
   ``train_pytorch.main`` unmodified, with recording hooks that score val/test on every row). Flags: the published
   Taobao flags of the official ``scripts/taobao.sh`` (:data:`PUBLISHED`, :data:`PER_MODEL`) with only the data paths,
   ``-item_n`` / ``-cate_n``, ``-test_interval``, ``-log_dir`` and ``-seed`` changed (``--epochs`` other than 2 only
   for a smoke test). A run past ``--run-timeout`` or the ``--deadline`` (seconds from the start) is killed; no run
   starts after the deadline.
5. **Results**: one line per (model, seed) appended to ``<results>/<tag>.jsonl`` as soon as it finishes
   (resumable: a (model, seed, epochs, test_interval) already there is skipped): ``implementation: official``,
   ``model`` (din | twin | dare), ``dataset``, ``seed``, ``dim`` (16), ``auc`` (test AUC of the checkpoint of best
   validation AUC, on every test row), ``best_val_auc`` / ``best_val_iter`` (the validation reading that picked it),
   ``seconds`` (the seed's wall time in ``train``), plus the official code's own reading, the unpatched
   first-2,048-row test reading at that checkpoint, GAUC, logloss and throughput. A table (beside
   ``benchmarks/dare_ml100k.py``'s) goes into ``<results>/dare_ml100k.md`` between ``<!-- dare_official:begin/end -->``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    ACTIVE,
    REPO,
    RESULTS,
    append_jsonl,
    machine_load,
    markdown_table,
    mean_std,
    parse_with_overrides,
    read_jsonl,
    replace_block,
    run_entry,
    stop_group,
    stop_on_sigterm,
)

COMMIT = "c72e087"
REPOSITORY = "https://github.com/thuml/DARE.git"
CODE_PATHS = ["train_pytorch.py", "dataset.py", "utils.py", "model", "tools", "scripts", "README.md"]
#: scripts/taobao.sh at c72e087, flags shared by DARE, TWIN and DIN (paths, vocabulary, seeds, log dir, test
#: interval left out: set per run)
PUBLISHED = [
    "-max_length", "200", "-long_seq_split", "0:200", "-short_model_type", "DIN", "-long_model_type", "DIN",
    "-use_cross_feature", "True", "-hard_or_soft", "soft", "-top_k", "20", "-use_aux_loss", "True",
    "-use_time_mode", "concat", "-time_embedding_dim", "16", "-category_embedding_dim", "16",
    "-batch_size", "2048", "-learning_rate", "0.01", "-weight_decay", "0.000001", "-log_interval", "50",
]  # fmt: skip
#: the per-model flags of scripts/taobao.sh (``-epoch 2`` is published for all three)
PER_MODEL = {
    "DARE": ["-attn_func", "scaled_dot_product", "-model_name", "DARE"],
    "twin": ["-attn_func", "scaled_dot_product", "-model_name", "twin"],
    "DIN": ["-attn_func", "learnable", "-model_name", "DIN", "-use_time"],
}
DIM = 16  # -category_embedding_dim / -time_embedding_dim (item dim = category dim) of the published flags


def ensure_official(folder: Path, git_dir: Path | None) -> str:
    """The official training code at :data:`COMMIT` in ``folder``; returns how it was obtained."""
    marker = folder / "COMMIT"
    if (folder / "train_pytorch.py").is_file():
        if marker.exists() and not marker.read_text().strip().startswith(COMMIT):
            raise SystemExit(f"{folder} holds thuml/DARE at {marker.read_text().strip()}, not {COMMIT}")
        return f"found in {folder}"
    with tempfile.TemporaryDirectory() as tmp:
        if git_dir is None:
            git_dir = Path(tmp) / "DARE.git"
            subprocess.run(["git", "clone", "--bare", "--quiet", REPOSITORY, str(git_dir)], check=True)
        full = subprocess.run(
            ["git", "--git-dir", str(git_dir), "rev-parse", f"{COMMIT}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        tar = subprocess.run(
            ["git", "--git-dir", str(git_dir), "archive", "--format=tar", full, *CODE_PATHS],
            check=True,
            capture_output=True,
        ).stdout
        part = folder.with_name(f".{folder.name}.part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(part, filter="data")
        (part / "COMMIT").write_text(full + "\n")
        part.replace(folder)
    return f"exported from {git_dir} at {full}"


def prepare_split(overrides: list[str]) -> Path:
    """The cached split ``pipelines.train data=ml100k <overrides>`` reads (prepared by ``pipelines.prepare``)."""
    run = run_entry("pipelines.prepare", ["data=ml100k", *overrides])
    found = re.search(r"dataset \S+ ready at (\S+):", run.stdout_tail)
    if not run.ok or found is None:
        raise SystemExit(f"pipelines.prepare failed:\n{run.stderr_tail}")
    return Path(found.group(1))


def convert(peers: Path, src: Path, work: Path, python: str) -> tuple[Path, dict]:
    """The split in the official on-disk format (the peer converter); returns its folder and report."""
    meta = json.loads((src / "meta.json").read_text())
    dst = work / "data" / f"{meta['name']}-{meta['fingerprint']}"
    report = dst / "conversion.json"
    if not (report.exists() and json.loads(report.read_text()).get("fingerprint") == meta["fingerprint"]):
        cmd = [python, str(peers / "convert_ml100k.py"), "convert", "--src", str(src), "--dst", str(dst)]
        proc = subprocess.run([*cmd, "--shards", "3"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"conversion failed:\n{proc.stderr[-3000:]}")
    return dst, json.loads(report.read_text())


def flags(model: str, data: Path, report: dict, seed: int, epochs: int, test_interval: int, log_dir: Path) -> list:
    """``train_pytorch.py`` flags of one run: the published ones, with paths, vocabulary, seed, test interval."""
    return [
        "-train_dataset_path", str(data / "train_{}_{}.npy"), "-val_dataset_path", str(data / "val.npy"),
        "-test_dataset_path", str(data / "test.npy"), "-item_n", str(report["item_n"]),
        "-cate_n", str(report["cate_n"]), *PUBLISHED, "-epoch", str(epochs), "-seed", str(seed),
        "-test_interval", str(test_interval), "-log_dir", str(log_dir), *PER_MODEL[model],
    ]  # fmt: skip


def run_logged(cmd: list[str], log: Path, timeout: float | None) -> int:
    """``cmd`` in its own process group, stdout and stderr to ``log``; killed past ``timeout`` seconds."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        ACTIVE.add(proc)
        try:
            return proc.wait(timeout=timeout)
        except BaseException:
            stop_group(proc, grace=5.0)
            raise
        finally:
            ACTIVE.discard(proc)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def to_row(raw: dict, model: str, args: argparse.Namespace, meta: dict, command: str, device: str) -> dict:
    """Our result line from ``run_official.py``'s line of one seed."""
    evals = raw["evals"]
    # the official selection: the first validation pass with the highest AUC (official calc_auc, strict >)
    best = max(range(len(evals)), key=lambda i: (evals[i]["val_auc_official_calc"], -i)) if evals else None
    at = evals[best] if best is not None else {}
    final = raw.get("final") or {}
    return {
        "implementation": "official",
        "model": model.lower(),
        "dataset": meta["name"],
        "seed": raw["seed"],
        "dim": DIM,
        "auc": final.get("auc"),
        "best_val_auc": at.get("val_auc"),
        "best_val_iter": at.get("iter"),
        "seconds": raw["seed_wall_seconds"],
        "auc_official_calc": final.get("auc_official_calc"),
        "test_head_auc": at.get("test_head_auc"),
        "test_rows": final.get("rows"),
        "logloss": final.get("logloss"),
        "gauc_user": final.get("gauc_user"),
        "gauc_category": final.get("gauc_cat"),
        "val_passes": len(evals),
        "train_iters": raw["train_iters"],
        "train_samples_per_s": raw["samples_per_s"],
        "epochs": args.epochs,
        "test_interval": args.test_interval,
        "official_commit": COMMIT,
        "data_fingerprint": meta["fingerprint"],
        "device": device,
        "command": command,
        "load": machine_load(),
    }


def run_all(args: argparse.Namespace) -> int:
    """Steps 1-4; returns how many runs did not finish."""
    start = time.monotonic()
    deadline = start + args.deadline if args.deadline else float("inf")
    official = args.official or args.work / f"code-{COMMIT}"
    print(f"[dare_official] official code {ensure_official(official, args.official_git)}", flush=True)
    src = prepare_split(args.overrides)
    data, report = convert(args.peers, src, args.work, args.python)
    meta = json.loads((src / "meta.json").read_text())
    print(f"[dare_official] split {src} -> {data} ({time.monotonic() - start:.0f} s)", flush=True)
    if args.prepare_only:
        return 0
    out_path = args.results / f"{args.tag}.jsonl"
    done = {(r["model"], r["seed"], r.get("epochs"), r.get("test_interval")) for r in read_jsonl(out_path)}
    device = device_name()
    logs = Path(os.environ.get("RECSYS_ROOT", REPO)) / "logs" / "benchmarks" / args.tag
    missed = 0
    for seed in args.seeds:
        for model in args.models:
            if (model.lower(), seed, args.epochs, args.test_interval) in done:
                continue
            left = deadline - time.monotonic()
            if left < 1:
                print(f"[dare_official] {model} seed {seed}: not started (deadline)", flush=True)
                missed += 1
                continue
            run_dir = logs / f"{model}-seed{seed}-{int(time.time())}"
            run_dir.mkdir(parents=True)
            own = ["--official", str(official), "--outdir", str(run_dir), "--tag", model]
            cmd = [args.python, str(args.peers / "run_official.py"), *own, "--"]
            cmd += flags(model, data, report, seed, args.epochs, args.test_interval, run_dir / "log")
            (run_dir / "log").mkdir()
            timeout = min(args.run_timeout or float("inf"), left)
            t0 = time.monotonic()
            try:
                code = run_logged(cmd, run_dir / "stdout.log", timeout if timeout < float("inf") else None)
            except subprocess.TimeoutExpired:
                print(f"[dare_official] {model} seed {seed}: stopped after {timeout:.0f} s", flush=True)
                missed += 1
                continue
            # the official CompleteLogger closes sys.stdout at the end of main, so a finished run exits with
            # Python's "cannot flush stdout" status 120: success = the seed's line written by run_official.py
            lines = [r for r in read_jsonl(run_dir / "results.jsonl") if r.get("seed") == seed]
            if not lines:
                tail = (run_dir / "stdout.log").read_text()[-2000:]
                print(f"[dare_official] {model} seed {seed}: exit {code}\n{tail}", flush=True)
                missed += 1
                continue
            row = {**to_row(lines[-1], model, args, meta, " ".join(cmd), device), "exit_code": code}
            append_jsonl(out_path, [row])
            print(
                f"[dare_official] {model} seed {seed}: test AUC {row['auc']:.4f} (best val {row['best_val_auc']:.4f} "
                f"at iteration {row['best_val_iter']}), {time.monotonic() - t0:.0f} s",
                flush=True,
            )
    return missed


def markdown(rows: list[dict], ours: list[dict], invocation: str) -> str:
    """The official rows per model, and ours at the same dim beside them."""
    text = [
        "### The authors' code on the same split (`benchmarks/dare_official.py`, written by the script)\n",
        f"thuml/DARE @ {COMMIT} `train_pytorch.py` unmodified (published Taobao flags; paths, vocabulary sizes and "
        "`-test_interval` changed; val/test scored on every row), on the split `pipelines.train data=ml100k` "
        "trains on, converted to its format; models one after another. Test AUC of the best-validation "
        f"checkpoint. `{invocation}`\n",
    ]
    body = []
    for model in ("din", "twin", "dare"):
        for setting in sorted({(r["epochs"], r["test_interval"], r["device"]) for r in rows if r["model"] == model}):
            mine = sorted(
                (r for r in rows if r["model"] == model and (r["epochs"], r["test_interval"], r["device"]) == setting),
                key=lambda r: r["seed"],
            )
            seeds = [r["seed"] for r in mine]
            same = [r["auc"] for r in ours if r["model"] == model and r["seed"] in seeds]
            body.append(
                [
                    model,
                    len(mine),
                    mean_std([r["auc"] for r in mine]),
                    mean_std([r["best_val_auc"] for r in mine]),
                    ",".join(str(r["best_val_iter"]) for r in mine),
                    mean_std([r["test_head_auc"] for r in mine]),
                    f"{setting[0]} / every {setting[1]} it.",
                    f"{statistics.mean(r['seconds'] for r in mine):.0f}",
                    setting[2],
                    f"{mean_std(same)} ({len(same)})" if same else "–",
                ]
            )
    columns = ["model", "seeds", "test AUC (all rows)", "best val AUC", "best at iteration", "test AUC, first"]
    columns[-1] += " 2,048 rows (unpatched)"
    more = ["epochs / validation", "s per seed", "device", "ours, dim 16, same seeds (n)"]
    text.append(markdown_table([*columns, *more], body))
    text.append(
        "`ours` = `benchmarks/dare_ml100k.py` rows at dim 16 (early stopping, patience 3, at most 30 epochs) with the "
        "same seed numbers "
        "(same split; seeds are not paired across implementations: the official loader has its own batch order)."
    )
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=REPO.parent / "shared" / "peers" / "dare_official")
    parser.add_argument("--official", type=Path, help="folder of the official code (default <work>/code-c72e087)")
    parser.add_argument("--official-git", type=Path, help="git dir of a thuml/DARE clone to export it from")
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("RECSYS_ROOT", REPO)) / ".data" / "dare_official"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter of the official code and the peers")
    parser.add_argument("--models", nargs="+", default=["DARE", "twin", "DIN"], choices=list(PER_MODEL))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=2, help="-epoch (published: 2; other values: smoke tests)")
    parser.add_argument("--test-interval", type=int, default=23, help="-test_interval (iterations)")
    parser.add_argument("--run-timeout", type=float, help="seconds before one (model, seed) run is killed")
    parser.add_argument("--deadline", type=float, help="wall-clock budget (s) from the start")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="dare_official")
    parser.add_argument("--ours", default="dare_ml100k", help="stem of our runs file beside it (<stem>_runs.jsonl)")
    parser.add_argument("--prepare-only", action="store_true", help="steps 1-3 only (code, split, conversion)")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rewrite the table")
    parser.add_argument("overrides", nargs="*", help="pipelines.prepare overrides (e.g. data.path=...)")
    args = parse_with_overrides(parser)
    args.peers, args.work = args.peers.resolve(), args.work.resolve()
    stop_on_sigterm()

    missed = 0 if args.report_only else run_all(args)
    rows = read_jsonl(args.results / f"{args.tag}.jsonl")
    ours = [
        r
        for r in read_jsonl(args.results / f"{args.ours}_runs.jsonl")
        if r.get("dim") == DIM and (r.get("patience"), r.get("max_epochs")) == (3, 30) and r.get("dataset") == "ml100k"
    ]
    if rows and not args.prepare_only:
        invocation = " ".join(["python -m benchmarks.dare_official", *sys.argv[1:]])
        if args.report_only:  # the table is rewritten from rows recorded elsewhere (e.g. on the GPU machine)
            invocation = "rows of dare_official.jsonl, each with its run_official.py command; table by " + invocation
        text = markdown(rows, ours, invocation)
        replace_block(args.results / f"{args.ours}.md", args.tag, text)
        print(text)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
