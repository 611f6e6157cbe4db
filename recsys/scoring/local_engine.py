"""``engine=local``: every file in this process — one after the other, or ``file_workers`` files at once — the next
batches of each file read ahead in a thread.

With ``file_workers=N`` each of N threads scores whole files (its read-ahead thread reads, validates, maps and
builds the batches; it runs the model and writes the file), so reading — what bounds a GPU job — runs N-wide. The
scorer runs the model one batch at a time (its own lock), so every output equals a one-thread job's; memory is
bounded by N x (``prefetch`` + 2) batches. With ``processes=N`` the files go to N worker processes instead, each
with its own copy of the model (:mod:`recsys.scoring.file_processes`): no interpreter lock between the files' host
work.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from recsys.bundle import load_bundle
from recsys.scoring.ctr_scorer import CTRScorer, ScoreStats
from recsys.scoring.file_processes import score_in_processes
from recsys.scoring.job import EngineResult, Plan, loaded_identity, make_scorer, score_file
from recsys.scoring.reader import count_rows, log_schema
from recsys.scoring.seq_scorer import SeqScorer
from recsys.system import peak_rss_mb, pinned_peak_mb


def score_locally(job: Plan, bundle_path: Path, identity: dict[str, Any], cfg) -> EngineResult:
    """Score ``job.todo`` here. Unreadable files or missing columns stop the job before any output."""
    device = str(cfg.get("device", "cpu"))
    prefetch = int(cfg.get("prefetch", 1)) if cfg.get("read_ahead", True) else 0
    processes = min(int(cfg.get("processes", 1)), max(len(job.todo), 1))
    if processes > 1:
        return _score_in_processes(job, bundle_path, identity, cfg, device, prefetch, processes)
    bundle = load_bundle(bundle_path)
    identity = loaded_identity(identity, bundle)
    scorer = make_scorer(bundle, cfg, device)
    todo = job.todo
    total = _checked_rows(todo, scorer.required_columns)
    stats, start = ScoreStats(), time.perf_counter()
    workers = min(int(cfg.get("file_workers", 1)), max(len(todo), 1))
    batch_size = int(cfg.batch_size)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="score_file")  # starts no thread until used
    with _progress(total, cfg) as bar:

        def one(entry: tuple[Path, Path]) -> ScoreStats:  # each file is renamed into place when done
            file, target = entry
            rejects, one_file = job.rejects(target), workers == 1  # several files at once: each decoded in its thread
            return score_file(scorer, file, target, rejects, batch_size, identity, bar.update, prefetch, one_file)

        try:
            for file_stats in pool.map(one, todo) if workers > 1 else map(one, todo):
                stats.add(file_stats)
        finally:  # a failed file stops the job: files not yet started are not started; finished ones are kept
            pool.shutdown(wait=True, cancel_futures=True)
    facts = _facts(device, bool(getattr(scorer, "fixed_shape", False)), time.perf_counter() - start)
    facts.update(file_workers=workers, peak_rss_mb=round(peak_rss_mb(), 1), pinned_peak_mb=pinned_peak_mb())
    return EngineResult(stats, len(todo), [], {**facts, "threads": torch.get_num_threads()})


def _score_in_processes(
    job: Plan, bundle_path: Path, identity: dict[str, Any], cfg, device: str, prefetch: int, processes: int
) -> EngineResult:
    """``processes`` worker processes, one file at a time each. The summary's ``seconds`` start once every worker
    has loaded the model, as the one-process job's start after its load (``workers_start_seconds``: the time
    before); its ``peak_rss_mb`` / ``pinned_peak_mb`` are this process's plus the workers' (high-water marks added)."""
    from omegaconf import OmegaConf

    # this process loads no model: the columns by the bundle's kind, as read_identity recorded it
    total = _checked_rows(job.todo, SeqScorer.required_columns if "top_n" in identity else CTRScorer.required_columns)
    threads = int(cfg.get("threads") or max(1, (os.cpu_count() or 1) // processes))
    settings = {**OmegaConf.to_container(cfg, resolve=True), "device": device, "threads": threads, "prefetch": prefetch}
    todo = [(file, target, job.rejects(target)) for file, target in job.todo]
    clock = {"launched": time.perf_counter()}
    with _progress(total, cfg) as bar:
        ready = lambda: clock.setdefault("start", time.perf_counter())  # noqa: E731
        stats, rss, pinned, fixed = score_in_processes(
            todo, bundle_path, identity, settings, processes, bar.update, ready
        )
    facts = _facts(device, fixed, time.perf_counter() - clock["start"])  # from the workers' first file
    facts.update(processes=processes, workers_start_seconds=round(clock["start"] - clock["launched"], 3))
    facts.update(peak_rss_mb=round(peak_rss_mb() + rss, 1), pinned_peak_mb=pinned, threads=threads)
    return EngineResult(stats, len(todo), [], facts)


def _checked_rows(todo: list[tuple[Path, Path]], required) -> int:
    """Fail fast, before any output, on unreadable files or missing columns; the rows to score (footers only)."""
    for file, _ in todo:
        log_schema(file, required)
    return sum(count_rows(f) for f, _ in todo)


def _progress(total: int, cfg) -> tqdm:
    return tqdm(total=total, unit="rows", unit_scale=True, disable=not cfg.progress, desc="scoring")


def _facts(device: str, fixed_shape: bool, seconds: float) -> dict[str, Any]:
    """The summary's ``last_run`` facts shared by both local paths (the caller adds its own)."""
    return {
        "engine": "local",
        "workers": 1,
        "processes": 1,
        "file_workers": 1,
        "device": device,
        "fixed_shape": fixed_shape,
        "seconds": round(seconds, 3),
    }
