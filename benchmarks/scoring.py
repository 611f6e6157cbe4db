"""Batch-scoring throughput against its two lower bounds, and local vs Ray engines (run by hand).

    .venv/bin/python -m benchmarks.scoring --model logs/train/runs/<dare run> [--model <dare x mmoe run>] \
        --rows 1000000 10000000 --threads 2
    .venv/bin/python -m benchmarks.scoring --model <run> --rows 1000000 --engine local ray --workers 1 2 \
        [--device cuda]
    .venv/bin/python -m benchmarks.scoring --model <run> --rows 10000000 --device cuda --threads 8 \
        --file-workers 1 4 8 --fixed-shape auto

``--file-workers N [N ...]`` runs the local job once per value (``file_workers=N``: N files read, mapped and
batched at once); ``--fixed-shape auto|true|false`` is passed to the job (``fixed_shape``: fixed-shape id
batches instead of KJTs; auto = on CUDA). Both go into every line (``file_workers``, ``fixed_shape`` as given,
``fixed_shape_used`` as the job resolved it); the read-only bound reads N files at once in N threads and the
forward-only bound times the job's own model stage (``CTRScorer.finish`` on a prepared batch, the
scorer built with the job's ``fixed_shape``).

With ``--engine ray`` the job runs on a local Ray instance over this machine's cores (``ray.workers=N``, one
CPU and ``--threads`` torch threads per worker); its lines carry ``engine``, ``workers``, the per-worker peak RSS
and ``job_seconds`` (wall clock of the whole command, Ray's start included) beside ``rows_per_s`` (the scoring
window, from the first file handed out to the last one back).

For each model bundle and size: generate Taobao-schema logs (history length 200, ids drawn from the
bundle's id maps, 10 files, row groups of 50k, streamed one row group at a time) under
logs/benchmarks/scoring/ (shared by bundles of the same dataset), then measure in one run
  * the scoring job end to end (`python -m pipelines.score`, a subprocess: rows/s and peak RSS),
  * read-only: the job's reader over the same files and columns (rows/s),
  * forward-only: the job's model stage (``CTRScorer.finish``) on one prepared batch of the same size (rows/s).
JSON lines go to benchmarks/results/scoring.jsonl (model, rows, rows_per_s, peak_rss_mb,
read_only_rows_per_s, forward_only_rows_per_s, threads) and a table to benchmarks/results/scoring.md;
the 1-minute load average around each run is printed (the table's notes are written by hand).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as pipelines.score, before torch loads OpenMP

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.bundle import IdMapper, LoadedBundle, load_bundle, resolve_bundle
from recsys.scoring.ctr_scorer import CTRScorer
from recsys.scoring.reader import SCORING_COLUMNS, iter_batches

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def raw_ids(mapper: IdMapper, limit: int) -> np.ndarray:
    """``[limit + 1]``: table row -> the raw id the logs carry (identity without an id map)."""
    if mapper.raw is None:
        return np.arange(limit + 1, dtype=np.int64)
    lookup = np.zeros(limit + 1, dtype=np.int64)
    lookup[mapper.rows] = mapper.raw
    return lookup


def log_ids(bundle: LoadedBundle) -> dict[str, np.ndarray]:
    """``item``, ``category``: table row -> the raw id the logs carry (:func:`raw_ids` of the bundle's maps)."""
    vocab = bundle.meta.vocab()
    return {
        "item": raw_ids(bundle.mappers["item"], vocab.num_items),
        "category": raw_ids(bundle.mappers["category"], vocab.num_categories),
    }


def log_group(rng: np.random.Generator, raw: dict[str, np.ndarray], rows: int, seq: int) -> pa.Table:
    """One row group of ``rows`` logs with ``seq`` behaviours each (ids uniform over the table rows)."""

    def ids(column: str, size: int) -> np.ndarray:
        return raw[column][rng.integers(1, len(raw[column]), size)]

    offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * seq)
    return pa.table(
        {
            "user": rng.integers(1, 1_000_000, rows),
            "item": ids("item", rows),
            "category": ids("category", rows),
            "timestamp": np.full(rows, 1_512_000_000, dtype=np.int64),
            "hist_item": pa.LargeListArray.from_arrays(offsets, pa.array(ids("item", rows * seq))),
            "hist_cat": pa.LargeListArray.from_arrays(offsets, pa.array(ids("category", rows * seq))),
        }
    )


def generate_logs(
    bundle_dir: Path,
    folder: Path,
    rows: int,
    seq: int = 200,
    files: int = 10,
    group: int = 50_000,
    seed: int = 0,
    jobs: int | None = None,
) -> None:
    """Taobao-schema logs (raw ids of the bundle's vocabulary), ``files`` files written by up to ``jobs`` processes
    (default: one per core), each a row group at a time, so memory is ``group x seq`` ids per process whatever
    ``rows``; file ``i`` draws from the seed sequence ``(seed, i)``. Skipped when already complete."""
    done = folder / "_COMPLETE"
    if done.exists():
        return
    raw = log_ids(load_bundle(bundle_dir))
    folder.mkdir(parents=True, exist_ok=True)
    per_file = rows // files
    sizes = [per_file if i < files - 1 else rows - per_file * (files - 1) for i in range(files)]
    jobs = max(1, min(files, jobs or os.cpu_count() or 1))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = [
            pool.submit(write_log_file, folder / f"part-{i:04d}.parquet", raw, n, seq, group, (seed, i))
            for i, n in enumerate(sizes)
        ]
        for part in parts:
            part.result()
    done.touch()


def write_log_file(
    path: Path, raw: dict[str, np.ndarray], rows: int, seq: int, group: int, seed: tuple[int, int]
) -> None:
    """One log file of ``rows`` rows in row groups of ``group`` (a process-pool task of :func:`generate_logs`)."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, group):
        table = log_group(rng, raw, min(group, rows - start), seq)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=group)
    writer.close()


def _started(seconds: float) -> None:
    """A reader process's first task: imports this module (and what the reader needs) before the clock starts."""
    time.sleep(seconds)


def rows_of(file: Path, batch_size: int, threads: bool = True) -> int:
    """Rows of one log file read by the job's reader (a task of :func:`read_only`)."""
    return sum(frame.height for frame in iter_batches(file, [*SCORING_COLUMNS, "timestamp"], batch_size, threads))


def read_only(folder: Path, batch_size: int, workers: int = 1, processes: bool = False) -> float:
    """Rows/s of the job's reader alone over every file, ``workers`` files at once (threads of this process, or
    with ``processes`` worker processes, as ``processes=N`` scores)."""
    files = sorted(folder.glob("part-*.parquet"))
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if processes
        else ThreadPoolExecutor(workers)
    )
    with pool:
        if processes:  # started and imported before the clock starts, as the job's workers load before scoring
            list(pool.map(_started, [0.5] * workers))  # busy at once: all started
        start = time.perf_counter()
        rows = sum(pool.map(rows_of, files, [batch_size] * len(files), [workers == 1] * len(files)))  # as the job
    return rows / (time.perf_counter() - start)


def forward_only(
    bundle_dir: Path, batch_size: int, seq: int = 200, batches: int = 20, device: str = "cpu", fixed_shape: str = "auto"
) -> float:
    """Rows/s of the job's model stage alone: :meth:`CTRScorer.finish` (copy to ``device``, id mapping there when
    the scorer does it, forward, scores back, output frame) on one batch of logs already read and prepared on the
    host, the scorer built as the job builds it (``fixed_shape``)."""
    bundle = load_bundle(bundle_dir)  # outside inference mode, as the scorer (weights keep version counters)
    setting = {"true": True, "false": False}.get(fixed_shape, fixed_shape)  # as Hydra reads the job's override
    scorer = CTRScorer(bundle, unseen="map", keep_columns=(), device=device, fixed_shape=setting)
    frame = pl.from_arrow(log_group(np.random.default_rng(0), log_ids(bundle), batch_size, seq))
    prepared = scorer.prepare(frame)
    scorer.finish(prepared)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        scorer.finish(prepared)  # returns once the scores are on the host: no extra sync
    return batches * batch_size / (time.perf_counter() - start)


def score(
    bundle_dir: Path,
    folder: Path,
    out: Path,
    batch_size: int,
    threads: int,
    engine: str = "local",
    workers: int = 1,
    device: str = "cpu",
    file_workers: int = 1,
    fixed_shape: str = "auto",
    prefetch: int | None = None,
    env: dict[str, str] | None = None,
    processes: int = 1,
) -> dict:
    """One ``pipelines.score`` run in a subprocess -> its ``_summary.json`` plus ``job_seconds`` (wall clock)."""
    cmd = [
        sys.executable,
        "-m",
        "pipelines.score",
        f"input={folder}",
        f"model={bundle_dir}",
        f"output={out}",
        f"batch_size={batch_size}",
        f"threads={threads}",
        "progress=false",
        f"hydra.run.dir={out}_hydra",
        f"engine={engine}",
        f"device={device}",
        f"file_workers={file_workers}",
        f"processes={processes}",
        f"fixed_shape={fixed_shape}",
        *([f"prefetch={prefetch}"] if prefetch is not None else []),
    ]
    if engine == "ray":
        gpus = 1 if device.startswith("cuda") else 0
        cmd += [f"ray.workers={workers}", f"ray.num_cpus={os.cpu_count()}", f"ray.num_gpus_per_worker={gpus}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, **(env or {})})
    summary = json.loads((out / "_summary.json").read_text())
    return {**summary, "job_seconds": round(time.perf_counter() - start, 2)}


def ray_overhead(calls: int = 300) -> dict:
    """What Ray itself costs the job, apart from scoring: starting a local instance, one actor task round trip
    (the per-file cost: the driver hands out a file and gets the counts back) and one fire-and-forget progress
    report (the per-batch cost, at most 4 per second per worker). No rows pass through Ray: workers read and
    write the files themselves, so nothing is serialised per row."""
    import ray

    from recsys.scoring.ray_engine import Progress

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    init_s = time.perf_counter() - start
    try:
        progress = ray.remote(num_cpus=0)(Progress).remote()
        start = time.perf_counter()
        ray.get(progress.total.remote())
        actor_start_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            ray.get(progress.total.remote())
        round_trip_ms = (time.perf_counter() - start) / calls * 1e3
        start = time.perf_counter()
        for i in range(calls):
            progress.set.remote("f", i)
        fire_ms = (time.perf_counter() - start) / calls * 1e3
    finally:
        ray.shutdown()
    return {
        "measure": "ray_overhead",
        "init_s": round(init_s, 2),
        "actor_start_s": round(actor_start_s, 2),
        "task_round_trip_ms": round(round_trip_ms, 3),
        "progress_report_ms": round(fire_ms, 3),
        "load": load(),
    }


def machine(device: str) -> str:
    """Cores and, on CUDA, the GPU: what the row was measured on."""
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return f"{os.cpu_count()} cores{gpu}"


def commit() -> str | None:
    """The checkout's commit (``RECSYS_COMMIT`` where the tree travels without its git folder)."""
    if os.environ.get("RECSYS_COMMIT"):
        return os.environ["RECSYS_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


def load() -> float:
    """The 1-minute load average (another job may share the cores)."""
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", action="extend", default=[], help="training run or bundle folders")
    parser.add_argument("--rows", nargs="+", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--threads", nargs="+", type=int, default=[2], help="torch threads; one run per value")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--engine", nargs="+", choices=["local", "ray"], default=["local"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1], help="Ray workers; one run per value")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (Ray: one GPU per worker)")
    parser.add_argument(
        "--file-workers", nargs="+", type=int, default=[1], help="local engine: files scored at once; one run each"
    )
    parser.add_argument(
        "--processes", nargs="+", type=int, default=[1], help="local engine: worker processes; one run each"
    )
    parser.add_argument(
        "--fixed-shape", choices=["auto", "true", "false"], default="auto", help="the job's fixed_shape (auto = CUDA)"
    )
    parser.add_argument("--no-bounds", action="store_true", help="skip the read-only / forward-only bounds")
    parser.add_argument("--prefetch", type=int, default=None, help="the job's prefetch (batches read ahead per file)")
    parser.add_argument("--prepare-only", action="store_true", help="generate the logs (cached) and stop")
    parser.add_argument(
        "--job-env", nargs="+", default=[], metavar="KEY=VALUE", help="environment of the job (e.g. allocator settings)"
    )
    parser.add_argument("--ray-overhead", action="store_true", help="also measure Ray's fixed and per-task costs")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.ray_overhead:
        row = ray_overhead()
        with (RESULTS / "scoring.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    work = REPO / "logs" / "benchmarks" / "scoring"
    bad = [item for item in args.job_env if "=" not in item]
    if bad:
        raise SystemExit(f"--job-env: {bad[0]!r} is not KEY=VALUE")
    job_env = dict(item.split("=", 1) for item in args.job_env)
    for rows in args.rows:
        for model in args.model:
            bundle_dir = resolve_bundle(model, work / "_download")
            identity = json.loads((bundle_dir / "bundle.json").read_text())
            folder = work / f"logs-{identity['data_fingerprint']}-{rows}"
            generate_logs(bundle_dir, folder, rows)
            if args.prepare_only:
                print(f"logs ready: {folder}", flush=True)
                continue
            forward = {}
            if not args.no_bounds:
                rate = forward_only(bundle_dir, args.batch_size, device=args.device, fixed_shape=args.fixed_shape)
                forward = {"forward_only_rows_per_s": round(rate, 1)}
            local = [(1, f, p) for f in args.file_workers for p in args.processes if f == 1 or p == 1]
            runs = [  # (engine, Ray workers, file workers, processes)
                (e, *run) for e in args.engine for run in ([(w, 1, 1) for w in args.workers] if e == "ray" else local)
            ]
            for threads in args.threads:
                for engine, workers, file_workers, processes in runs:
                    torch.set_num_threads(threads)
                    bounds = dict(forward)
                    if not args.no_bounds:  # what the job's file threads (or processes) read, at this many threads
                        rate = read_only(folder, args.batch_size, max(file_workers, processes), processes > 1)
                        bounds = {"read_only_rows_per_s": round(rate, 1), **forward}
                    name = (
                        f"scores-{bundle_dir.parent.name}-{rows}-{engine}{workers}-f{file_workers}-p{processes}"
                        f"-{args.fixed_shape}-{threads}-{int(time.time())}"
                    )
                    load_before = load()
                    summary = score(
                        bundle_dir,
                        folder,
                        work / name,
                        args.batch_size,
                        threads,
                        engine,
                        workers,
                        args.device,
                        file_workers,
                        args.fixed_shape,
                        args.prefetch,
                        job_env,
                        processes,
                    )
                    last = summary["last_run"]
                    row = {
                        "model": identity["run_name"],
                        "rows": rows,
                        "engine": engine,
                        "workers": workers,
                        "device": args.device,
                        "rows_per_s": last["rows_per_s"],
                        "job_seconds": summary["job_seconds"],
                        "peak_rss_mb": last["peak_rss_mb"],
                        "pinned_peak_mb": last.get("pinned_peak_mb"),
                        "worker_peak_rss_mb": last.get("worker_peak_rss_mb", [last["peak_rss_mb"]]),
                        "file_workers": file_workers,
                        "processes": processes,
                        "fixed_shape": args.fixed_shape,
                        "fixed_shape_used": last.get("fixed_shape"),
                        **({"workers_start_seconds": last["workers_start_seconds"]} if processes > 1 else {}),
                        **bounds,
                        "threads": threads,
                        "prefetch": args.prefetch,
                        **({"job_env": job_env} if job_env else {}),
                        "load": [load_before, load()],
                        "machine": machine(args.device),
                        "commit": commit(),
                        "entry": "pipelines.score",
                    }
                    with (RESULTS / "scoring.jsonl").open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(json.dumps(row), f"scoring {last['seconds']} s", flush=True)
    write_table()


def write_table() -> None:
    """The generated tables of benchmarks/results/scoring.md from every line of scoring.jsonl (the text around
    them, between ``<!-- name -->`` / ``<!-- /name -->`` markers, is kept)."""
    rows = [json.loads(line) for line in (RESULTS / "scoring.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "measure" not in r]  # Ray's overhead lines: quoted in the text
    bounds = [
        "| model | rows | threads | rows/s | read-only rows/s | forward-only rows/s | bound / rows/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in rows if "engine" not in r]:
        bound = min(r["read_only_rows_per_s"], r["forward_only_rows_per_s"])
        bounds.append(
            f"| {r['model']} | {r['rows']:,} | {r['threads']} | {r['rows_per_s']:,.0f} | "
            f"{r['read_only_rows_per_s']:,.0f} | {r['forward_only_rows_per_s']:,.0f} | "
            f"{bound / r['rows_per_s']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    engines = [
        "| model | rows | engine | workers | file workers | processes | fixed shape | device | rows/s | "
        "read-only rows/s | forward-only rows/s | job wall s | driver peak RSS (MB) | per-worker peak RSS (MB) | "
        "load avg (start, end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in rows if "engine" in r]:
        per_worker = ", ".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"])
        fixed = f"{r['fixed_shape']} ({'yes' if r['fixed_shape_used'] else 'no'})" if "fixed_shape" in r else "-"
        read, forward = (f"{r[k]:,.0f}" if k in r else "-" for k in ("read_only_rows_per_s", "forward_only_rows_per_s"))
        engines.append(
            f"| {r['model']} | {r['rows']:,} | {r['engine']} | {r['workers']} | {r.get('file_workers', 1)} | "
            f"{r.get('processes', 1)} | {fixed} | {r['device']} | {r['rows_per_s']:,.0f} | {read} | {forward} | "
            f"{r['job_seconds']} | {r['peak_rss_mb']:.0f} | {per_worker} | "
            f"{r['load'][0]}, {r['load'][1]} |"
        )
    path = RESULTS / "scoring.md"
    text = path.read_text() if path.exists() else ""
    for name, table in (("bounds-table", bounds), ("engine-table", engines)):
        start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        block = "\n".join([start, *table, end])
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
        else:
            text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)
    plot_gpu([r for r in rows if r.get("device", "").startswith("cuda")], RESULTS / "scoring_gpu.png")
    print("\n".join(engines))


TARGET_ROWS_PER_S, RSS_BOUND_MB = 2_000_000, 4096  # issue 14: GPU scoring of DARE at 10 M rows


def gpu_label(r: dict) -> str:
    """One run's configuration in a few words: how the files were spread, batch form, what differed."""
    threads, processes = r.get("file_workers", 1), r.get("processes", 1)
    spread = f"{processes} processes" if processes > 1 else f"{threads} file thread{'s' * (threads > 1)}"
    form = "fixed shape" if r.get("fixed_shape_used") else "KJT"  # rows before fixed shapes existed: KJT
    extra = [f"{r['rows'] / 1e6:g} M rows"] if r["rows"] != 10_000_000 else []
    extra += [f"prefetch {r['prefetch']}"] if r.get("prefetch") == 0 else []
    extra += ["allocators' decay 0"] if r.get("job_env") else []
    return ", ".join([spread, form, *extra, f"@{r.get('commit') or '?'}"])


def plot_gpu(rows: list[dict], path: Path) -> None:
    """Rows/s and peak host RSS of the GPU scoring runs (one bar each, in recording order) against the targets."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [gpu_label(r) for r in rows]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.6), sharey=True)
    y = np.arange(len(rows))
    speed.barh(y, [r["rows_per_s"] / 1e6 for r in rows], color="tab:blue")
    speed.axvline(TARGET_ROWS_PER_S / 1e6, color="tab:red", linestyle="--", label="target 2 M rows/s")
    speed.set(yticks=y, yticklabels=labels, xlabel="end-to-end M rows/s (one H200)")
    speed.invert_yaxis()  # shared with the RSS panel: first run on top
    memory.barh(y, [r["peak_rss_mb"] / 1024 for r in rows], color="tab:orange")
    memory.axvline(RSS_BOUND_MB / 1024, color="tab:red", linestyle="--", label="bound 4 GiB")
    memory.set(xlabel="peak host RSS, GiB (processes: sum of their peaks)")
    for ax in (speed, memory):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
